"""Who gives back an early-stopped trial's placement group: Ray Train's own cleaner when Ray's state API answers
(it needs it to see the trial's controller die), the sweep's ReleaseStoppedTrials only when it does not."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
import ray
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from orchestrator.sweep import release_placement_group, state_api_reachable

CLEANER = "by Ray Train's placement group cleaner"
OTHER_RAY = ("import sys, ray; ray.init(address='local', num_cpus=1, include_dashboard=True, logging_level='ERROR'); "
             "print('up', flush=True); sys.stdin.read(); ray.shutdown()")


@ray.remote(num_cpus=0.5)
class Holder:
    def ping(self) -> int:
        return 1


def _group_with_an_actor():
    """A 0.5-CPU placement group and its one running actor (a stand-in for a trial's Train worker)."""
    group = placement_group([{"CPU": 0.5}])
    ray.get(group.ready(), timeout=60)
    actor = Holder.options(scheduling_strategy=PlacementGroupSchedulingStrategy(group)).remote()
    assert ray.get(actor.ping.remote(), timeout=60) == 1
    return group, actor


def _group_with_a_dead_actor():
    """A 0.5-CPU placement group whose only actor (a stand-in for a stopped trial's worker) has been killed."""
    group, actor = _group_with_an_actor()
    ray.kill(actor)
    return group


@pytest.fixture
def ray_without_dashboard():
    ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="ERROR")
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture
def ray_with_dashboard():
    ray.init(address="local", num_cpus=1, include_dashboard=True, logging_level="ERROR")
    try:
        deadline = time.time() + 60
        while not state_api_reachable() and time.time() < deadline:
            time.sleep(0.5)
        yield
    finally:
        ray.shutdown()


@pytest.fixture
def other_ray_with_dashboard():
    """Another Ray on the machine, its dashboard on Ray's default port when free (where Ray's state client looks
    when the cluster it is asked about has no dashboard)."""
    other = subprocess.Popen([sys.executable, "-c", OTHER_RAY], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    try:
        assert other.stdout.readline().strip() == "up"
        yield
    finally:
        other.communicate("", timeout=120)


def test_without_the_state_api_the_sweep_removes_the_group_once_its_actors_are_gone(other_ray_with_dashboard,
                                                                                    ray_without_dashboard, capsys):
    assert not state_api_reachable()  # another Ray's dashboard answering does not count
    group = _group_with_a_dead_actor()
    assert release_placement_group(group.id.hex(), "t03_stopped", wait_s=60)
    assert placement_group_table(group)["state"] == "REMOVED"
    out = capsys.readouterr().out
    assert "trial t03_stopped: stopped early; released its Train workers' placement group (0.5 CPU)" in out
    assert CLEANER not in out


def test_a_group_still_in_use_is_left_to_the_end_of_the_sweep(ray_without_dashboard, capsys):
    group, actor = _group_with_an_actor()
    assert not release_placement_group(group.id.hex(), "t01_busy", wait_s=2)
    assert placement_group_table(group)["state"] == "CREATED"
    assert "was still in use after 2s; it is released when the sweep ends" in capsys.readouterr().out
    ray.kill(actor)


def test_with_the_state_api_the_group_is_left_to_ray_trains_cleaner(ray_with_dashboard, capsys):
    assert state_api_reachable()
    group = _group_with_a_dead_actor()
    # Ray Train's cleaner checks its controller every second; here it is played by a thread a little later.
    cleaner = threading.Timer(3.0, remove_placement_group, args=(group,))
    cleaner.start()
    try:
        assert release_placement_group(group.id.hex(), "t03_stopped", wait_s=60)
    finally:
        cleaner.join()
    assert placement_group_table(group)["state"] == "REMOVED"
    out = capsys.readouterr().out
    assert f"trial t03_stopped: stopped early; released its Train workers' placement group (0.5 CPU, {CLEANER})" in out


def test_with_the_state_api_the_sweep_still_removes_a_group_the_cleaner_leaves(ray_with_dashboard, capsys):
    group = _group_with_a_dead_actor()
    assert release_placement_group(group.id.hex(), "t03_stopped", wait_s=60, cleaner_grace_s=1.0)
    assert placement_group_table(group)["state"] == "REMOVED"
    out = capsys.readouterr().out
    assert "released its Train workers' placement group (0.5 CPU; Ray Train's cleaner had not within 1s)" in out
