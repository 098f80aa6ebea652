"""`ray job submit --working-dir .`: what the uploaded package carries (Ray's own packaging code), and
real submissions to a token-authenticated head on 127.0.0.1: jobs run from the package, the sweep's
entry point runs as a job, failures are reported, and submissions without the right token are refused."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import urllib.error
import uuid
from pathlib import Path
from zipfile import ZipFile

import pytest

from .conftest import REPO

# Paths a user's checkout accumulates that must never travel to the cluster with a job.
IGNORED = [
    ".venv/lib/python3.11/site-packages/torch/big.so",
    ".cache/shards/voc/train/part-00000.parquet",
    "ray_results/voc_convnext_t/checkpoint_000001/model.pt",
    "mlruns.db",
    "mlruns/0/meta.yaml",
    "mlartifacts/1/plot.png",
    "orchestrator/__pycache__/config.cpython-311.pyc",
    "sweep.log",
    "build/lib/orchestrator/config.py",
    "dist/pir_at_ray-0.1.0-py3-none-any.whl",
]
SHIPPED = [".gitignore", "pyproject.toml", "experiments/pir_at_sweep.py", "orchestrator/config.py",
           "experiments/configs/demo.yaml"]


def package_files(directory: Path, scratch: Path) -> set[str]:
    """Files in the zip that `ray job submit --working-dir DIRECTORY` uploads, built by Ray's own code path
    (working_dir.upload_working_dir_if_needed -> packaging.create_package, .gitignore respected)."""
    from ray._private.runtime_env.packaging import create_package
    from ray._private.runtime_env.working_dir import upload_working_dir_if_needed

    target = scratch / "package.zip"

    def upload_fn(working_dir, excludes, is_file=False):
        assert not is_file
        create_package(working_dir, target, include_gitignore=True, include_parent_dir=False, excludes=excludes)

    upload_working_dir_if_needed({"working_dir": str(directory)}, include_gitignore=True, upload_fn=upload_fn)
    with ZipFile(target) as archive:
        return {name for name in archive.namelist() if not name.endswith("/")}


def test_package_leaves_out_every_git_ignored_path(tmp_path):
    checkout = tmp_path / "checkout"
    for rel in SHIPPED:
        (checkout / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / rel, checkout / rel)
    for rel in IGNORED:
        (checkout / rel).parent.mkdir(parents=True, exist_ok=True)
        (checkout / rel).write_bytes(b"x" * 64)
    files = package_files(checkout, tmp_path)
    assert files == set(SHIPPED), f"shipped {sorted(files - set(SHIPPED))}, lost {sorted(set(SHIPPED) - files)}"


def test_package_of_this_checkout_is_what_git_tracks(tmp_path):
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout")
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    expected = {path for path in listed if path and (REPO / path).is_file()}
    files = package_files(REPO, tmp_path)
    assert files == expected, f"extra {sorted(files - expected)[:10]}, missing {sorted(expected - files)[:10]}"


# ---------------------------------------------------------------------------------------------
# Real submissions (one Ray head for the whole session)

PROBE = """
import json, os, orchestrator
print('PROBE ' + json.dumps({
    'cwd': os.getcwd(),
    'decoy_present': os.path.exists(os.environ['DECOY']),
    'script_present': os.path.isfile('experiments/pir_at_sweep.py'),
    'orchestrator': orchestrator.__file__,
    'auth_mode': os.environ.get('RAY_AUTH_MODE'),
}))
"""


@pytest.mark.slow
def test_job_runs_from_the_uploaded_working_dir(ray_head):
    cache = REPO / ".cache"
    created_cache = not cache.exists()
    decoy_dir = cache / f"ray-job-decoy-{uuid.uuid4().hex[:8]}"
    decoy = decoy_dir / "decoy.txt"
    decoy_dir.mkdir(parents=True)
    decoy.write_text("a git-ignored file that must not be uploaded")
    submission_id = f"probe-{uuid.uuid4().hex[:8]}"
    try:
        result = ray_head.submit("python", "-c", PROBE, submission_id=submission_id,
                                 runtime_env={"env_vars": {"DECOY": str(decoy.relative_to(REPO))}})
    finally:
        shutil.rmtree(decoy_dir)
        if created_cache:
            with contextlib.suppress(OSError):  # another test may have put something there meanwhile
                cache.rmdir()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert ray_head.job_info(submission_id)["status"] == "SUCCEEDED"
    probe = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("PROBE "))[6:])
    cwd = Path(probe["cwd"])
    assert cwd != REPO and str(ray_head.temp_dir) in str(cwd), probe
    assert probe["script_present"] and not probe["decoy_present"], probe
    assert Path(probe["orchestrator"]).is_relative_to(cwd), "the job must import the uploaded code"
    assert probe["auth_mode"] == "token"


@pytest.mark.slow
def test_sweep_entry_point_runs_as_a_ray_job(ray_head):
    submission_id = f"dry-run-{uuid.uuid4().hex[:8]}"
    result = ray_head.submit("python", "experiments/pir_at_sweep.py", "--dry-run", submission_id=submission_id)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "ScalingConfig(num_workers=1" in result.stdout and "Sweep 'demo'" in result.stdout
    assert ray_head.job_info(submission_id)["status"] == "SUCCEEDED"


@pytest.mark.slow
def test_failing_job_is_reported_failed(ray_head):
    submission_id = f"fail-{uuid.uuid4().hex[:8]}"
    result = ray_head.submit("python", "-c", "import sys; sys.exit(3)", submission_id=submission_id)
    assert result.returncode != 0
    info = ray_head.job_info(submission_id)
    assert info["status"] == "FAILED" and info["driver_exit_code"] == 3, info
    assert "failed with exit code 3" in info["message"]


def _without_token(ray_head, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in ray_head.env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token to fall back on
    env.update(extra)
    return env


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra, expected",
    [
        ({}, "Missing authentication token"),
        ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-token"}, "Invalid authentication token"),
    ],
    ids=["no-token", "wrong-token"],
)
def test_submission_without_the_token_is_refused(ray_head, tmp_path, extra, expected):
    submission_id = f"refused-{uuid.uuid4().hex[:8]}"
    result = ray_head.submit("python", "-c", "print('ran')", submission_id=submission_id,
                             env=_without_token(ray_head, tmp_path, **extra), timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "AuthenticationError" in output, output[-3000:]
    assert expected in output
    with pytest.raises(urllib.error.HTTPError) as error:  # nothing was created
        ray_head.job_info(submission_id)
    assert error.value.code == 404


@pytest.mark.slow
@pytest.mark.parametrize("token, status", [(None, 401), ("not-the-token", 403)], ids=["none", "wrong"])
def test_jobs_api_rejects_requests_without_the_token(ray_head, token, status):
    import urllib.request

    request = urllib.request.Request(f"{ray_head.dashboard_url}/api/jobs/")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=10)
    assert error.value.code == status
