"""The loopback S3 server works for every client the project uses (boto3, smart_open, pyarrow)."""

from __future__ import annotations

import pyarrow.fs as pafs
import smart_open


def test_clients_reach_loopback_s3(s3_bucket):
    with smart_open.open(f"{s3_bucket}/a/hello.txt", "w") as handle:
        handle.write("hello")
    fs, path = pafs.FileSystem.from_uri(f"{s3_bucket}/a/hello.txt")
    with fs.open_input_stream(path) as stream:
        assert stream.read() == b"hello"
