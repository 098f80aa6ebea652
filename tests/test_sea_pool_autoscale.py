"""The SEA pool autoscales on a simulated 2-node cluster: it grows past one actor while batches are queued and
holds no CPU once the scoring is done."""

from __future__ import annotations

import os
import time

import pytest

from .conftest import REPO
from .test_sweep import trained_checkpoint  # noqa: F401 (a fixture)

NODE_CPUS = 2


@pytest.mark.slow
@pytest.mark.realpath
def test_pool_grows_past_one_actor_and_releases_its_cpus(trained_checkpoint):  # noqa: F811 (the fixture)
    import ray
    from ray.cluster_utils import Cluster

    from orchestrator.cluster import quiet_data
    from orchestrator.config import with_values
    from orchestrator.sea_pool import score_checkpoint

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
        outcome = score_checkpoint(config, checkpoint)
        assert outcome.images == 16
        # 8 batches queued for one actor: the pool grew, and more than one actor's results were used
        assert 1 < len(outcome.scored_by) <= config.sea.max_actors, outcome.scored_by
        deadline = time.time() + 60
        while time.time() < deadline and ray.available_resources().get("CPU", 0.0) < total:
            time.sleep(0.5)
        assert ray.available_resources().get("CPU", 0.0) == total  # no actor left holding a CPU
    finally:
        ray.shutdown()
        cluster.shutdown()
