"""Scoring throughput of experiments/sea_eval.py with 2 actors vs 1 (the issue's target: >= 1.8x images/s).

Generated VOC-layout data and a random checkpoint in the published layout (UPerNet-ConvNeXt-atto, CvSt), scored by
the CLI twice, each in a fresh process with a local Ray, one CPU thread per actor; images/s is the job's own figure
(the last progress line: images scored over the scoring wall time, from the moment every actor has built its
model). Run it on a quiet machine with at least 2 free cores:

    PYTHONPATH=. python experiments/benchmarks/sea_eval_actors.py --images 64 --iterations 20
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from orchestrator.redact import environment_snapshot  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--block-images", type=int, default=4)
    parser.add_argument("--size", type=int, default=96, help="crop size of the scored images")
    args = parser.parse_args()
    from tests.test_published_layout import ATTO, published_state

    rates = {}
    with tempfile.TemporaryDirectory() as folder:
        weights = os.path.join(folder, "published.pth")
        torch.save(published_state(ATTO, 21), weights)
        for actors in (1, 2):
            config = {
                "data": {"dataset": "voc_aug", "shards": os.path.join(folder, "shards"), "crop_size": args.size,
                         "val_size": args.size, "shard_rows": 8, "select_images": 2,
                         "synthetic": {"seed": 0, "train_images": 4, "val_images": args.images, "num_classes": 4,
                                       "height": args.size + 24, "width": args.size + 40}},
                "model": {"decoder": "upernet", "backbone": "convnext_atto", "stem": "cvst", "decoder_width": 32,
                          "weights": weights},
                "sea": {"eps": [4, 8], "iterations": args.iterations, "losses": ["mce-bal", "mce", "js"],
                        "batch_size": args.block_images, "max_actors": actors, "cpus_per_actor": 1},
                "eval": {"name": f"bench{actors}", "block_images": args.block_images,
                         "output": os.path.join(folder, f"out{actors}")},
                "tracking": {"uri": f"sqlite:///{folder}/mlruns.db", "experiment": "bench"},
            }
            path = os.path.join(folder, f"bench{actors}.yaml")
            Path(path).write_text(yaml.safe_dump(config))
            env = {**environment_snapshot(), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
            done = subprocess.run([sys.executable, str(REPO / "experiments" / "sea_eval.py"), "--config", path],
                                  capture_output=True, text=True, env=env, cwd=folder)
            if done.returncode:
                print(done.stderr[-3000:], file=sys.stderr)
                return done.returncode
            rates[actors] = float(re.findall(r"([0-9.]+) images/s", done.stderr)[-1])
            print(f"{actors} actor(s): {rates[actors]:.3f} images/s", flush=True)
    print(f"speed-up 2 vs 1 actors: {rates[2] / rates[1]:.2f}x (target >= 1.8x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
