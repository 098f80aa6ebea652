"""Which training image goes where in an epoch: a pure function of (seed, epoch, position), nothing else.

The epoch's order is a permutation of the split's rows drawn from (seed, epoch). Global step s takes
positions [s·B, (s+1)·B) of that order (B the global batch); worker r of w takes the r-th of w equal
slices of each step's positions. So the global batch of every step, and the crop and flip of every image
(drawn from (seed, epoch, position)), are the same whatever the number of workers, the task timing or the
number of passes a data system has made, and a resumed run replays exactly the epochs it has not done.
The rows past the last whole global batch are left out of that epoch (another permutation next epoch).
"""

from __future__ import annotations

import numpy as np


def epoch_order(total_rows: int, *, seed: int, epoch: int) -> np.ndarray:
    """Row indices (0..total_rows-1) in the order epoch `epoch` visits them."""
    if total_rows < 1:
        raise ValueError(f"total_rows = {total_rows}: the training split is empty")
    if epoch < 1:
        raise ValueError(f"epoch = {epoch}: epochs count from 1")
    return np.random.default_rng([seed, epoch]).permutation(total_rows)


def worker_positions(*, steps: int, global_batch: int, world_size: int, rank: int) -> np.ndarray:
    """Positions in the epoch order that worker `rank` trains on, in the order it takes them."""
    if global_batch % world_size:
        raise ValueError(f"global batch {global_batch} does not split evenly across {world_size} workers")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank}: must be in [0, {world_size})")
    per_worker = global_batch // world_size
    starts = np.arange(steps)[:, None] * global_batch + rank * per_worker
    return (starts + np.arange(per_worker)[None, :]).reshape(-1)


def sample_rng(*, seed: int, epoch: int, position: int) -> np.random.Generator:
    """The generator of one image's random scale, crop and flip."""
    return np.random.default_rng([seed, epoch, position])
