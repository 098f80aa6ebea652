"""The SEA pool autoscales on a simulated 2-node cluster: it grows past one actor while batches are queued and
holds no CPU once the scoring is done."""

from __future__ import annotations

import os
import threading
import time

import pytest

from .conftest import REPO
from .test_sweep import trained_checkpoint  # noqa: F401 (a fixture)

NODE_CPUS = 2


def pool_actors() -> set[str]:
    """Ids of the SEA pool's actors (Ray Data MapWorkers) that are alive or being started, from the GCS actor table."""
    from ray._private.state import actors

    return {actor_id for actor_id, info in actors().items()
            if "MapWorker" in info["ActorClassName"] and info["State"] in ("ALIVE", "PENDING_CREATION", "RESTARTING")}


def watched(fn) -> tuple[object, list[set[str]]]:
    """fn's result and the pool actors seen every 0.2 s while it ran."""
    seen: list[set[str]] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.append(pool_actors())
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        return fn(), seen
    finally:
        done.set()
        watcher.join(timeout=10)


def released(ray, total: float, wait_s: float = 60.0) -> None:
    """Wait until every CPU of the cluster is free again (the pool's actors gone); fail if not within wait_s."""
    deadline = time.time() + wait_s
    while time.time() < deadline and ray.available_resources().get("CPU", 0.0) < total:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0.0) == total, ray.available_resources()


@pytest.mark.slow
@pytest.mark.realpath
def test_pool_grows_past_one_actor_and_releases_its_cpus(trained_checkpoint):  # noqa: F811 (the fixture)
    import ray
    from ray.cluster_utils import Cluster

    from orchestrator.cluster import quiet_data
    from orchestrator.config import with_values
    from orchestrator.sea_pool import ScoringCancelled, score_checkpoint

    config, checkpoint = trained_checkpoint
    config = with_values(config, {"sea.iterations": 6, "sea.losses": ["mce", "js"], "sea.images": 16,
                                  "sea.batch_size": 2, "sea.min_actors": 1, "sea.max_actors": 3,
                                  "sea.cpus_per_actor": 1})
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": NODE_CPUS, "include_dashboard": False})
    cluster.add_node(num_cpus=NODE_CPUS)
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    ray.init(address=cluster.address, runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, logging_level="ERROR")
    try:
        cluster.wait_for_nodes()
        quiet_data()
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        total = ray.cluster_resources()["CPU"]
        assert total == 2 * NODE_CPUS
        outcome, seen = watched(lambda: score_checkpoint(config, checkpoint))
        assert outcome.images == 16 and outcome.scored_by
        # 8 batches queued for one actor: the pool grew past one actor, up to sea.max_actors
        assert 1 < max(len(ids) for ids in seen) <= config.sea.max_actors, [len(ids) for ids in seen]
        released(ray, total)  # no actor left holding a CPU
        assert not pool_actors()
        # an interrupted job stops scoring at the first batch back: ScoringCancelled, and the pool is released too
        stop = threading.Event()
        stop.set()
        with pytest.raises(ScoringCancelled):
            score_checkpoint(config, checkpoint, stop=stop)
        released(ray, total)
        assert not pool_actors()
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.slow
def test_spread_pool_gives_each_batch_an_actor_and_the_same_scores(trained_checkpoint, repo_env):  # noqa: F811
    """After the sweep's last trial (spread), a pool scores 2 batches on 2 actors at once; the numbers are those of
    the pool beside training, which queues both batches on one actor and starts no second one (it would get no
    batch). With whole-CPU actors on 2 CPUs the spread pool keeps one, so that the images' read task (1 CPU) can
    run."""
    import ray

    from orchestrator.config import with_values
    from orchestrator.sea_pool import score_checkpoint

    config, checkpoint = trained_checkpoint
    config = with_values(config, {"sea.iterations": 4, "sea.losses": ["mce", "js"], "sea.images": 8,
                                  "sea.batch_size": 4, "sea.min_actors": 1, "sea.max_actors": 2,
                                  "sea.cpus_per_actor": 0.5, "cluster.cpus_per_data_task": 1})
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR",
             runtime_env={"env_vars": {"PYTHONPATH": repo_env["PYTHONPATH"]}})
    try:
        beside, seen = watched(lambda: score_checkpoint(config, checkpoint))
        spread = score_checkpoint(config, checkpoint, spread=True)
        whole = score_checkpoint(with_values(config, {"sea.cpus_per_actor": 1}), checkpoint, spread=True)
    finally:
        ray.shutdown()
    assert beside.images == spread.images == whole.images == 8
    assert len(spread.scored_by) == 2 and len(whole.scored_by) == 1, (spread.scored_by, whole.scored_by)
    assert len(beside.scored_by) == 1 and max(len(ids) for ids in seen) == 1, [len(ids) for ids in seen]
    assert spread.by_eps == beside.by_eps == whole.by_eps


def test_background_scorer_lowers_only_its_own_cpu_priority(trained_checkpoint):  # noqa: F811
    import numpy as np

    from orchestrator.config import to_dict, with_values
    from orchestrator.sea_pool import BACKGROUND_NICE, SeaScorer

    config, checkpoint = trained_checkpoint
    config = with_values(config, {"sea.iterations": 2, "sea.losses": ["mce"]})
    rng = np.random.default_rng(0)
    batch = {"id": np.array(["a", "b"], dtype=object), "image": rng.integers(0, 256, (2, 3, 64, 64), np.uint8),
             "label": rng.integers(0, config.data.num_classes, (2, 64, 64)).astype(np.uint8)}
    seen: dict[bool, tuple[int, int]] = {}

    def score(background: bool) -> None:
        scorer = SeaScorer(checkpoint, to_dict(config), config.data.num_classes, threads=1, background=background)
        before = os.getpriority(os.PRIO_PROCESS, 0)
        scorer(batch)
        seen[background] = (before, os.getpriority(os.PRIO_PROCESS, 0))

    mine = os.getpriority(os.PRIO_PROCESS, 0)
    for background in (False, True):
        thread = threading.Thread(target=score, args=(background,))
        thread.start()
        thread.join()
    assert seen[False][1] == seen[False][0] == mine
    assert seen[True][1] == max(mine, BACKGROUND_NICE)
    assert os.getpriority(os.PRIO_PROCESS, 0) == mine  # per thread: the caller's priority is untouched
