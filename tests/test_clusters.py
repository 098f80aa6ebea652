"""Cluster configs: the launcher YAMLs pass Ray's own schema, autoscale GPU workers, install the project
and turn on token auth; the KubeRay RayJob runs a real script and config that pass --dry-run."""

from __future__ import annotations

import copy
import re
import shlex
import subprocess
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from orchestrator.config import load_config

from .conftest import PYTHON, REPO

CLUSTERS = REPO / "experiments" / "clusters"
LAUNCHER_YAMLS = [CLUSTERS / "aws.yaml", CLUSTERS / "gcp.yaml"]
RAYJOB = CLUSTERS / "kuberay-rayjob.yaml"
DOCKERFILE = CLUSTERS / "Dockerfile"
DOCS = REPO / "docs" / "cluster.md"
RECIPES = sorted(p for p in (REPO / "experiments" / "configs").glob("*.yaml") if p.stem != "demo")
TOKEN_FILE = "~/.ray/auth_token"


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def ray_up_view(path: Path) -> dict:
    """The config as `ray up` validates it: provider defaults merged in by Ray's prepare_config."""
    return prepare_config(load(path))


def start_commands(config: dict) -> list[str]:
    return [" ".join(c.split()) for key in ("head_start_ray_commands", "worker_start_ray_commands")
            for c in config[key] if "ray start" in c]


def gpu_node_types(config: dict) -> dict[str, dict]:
    return {name: node for name, node in config["available_node_types"].items()
            if name != config["head_node_type"] and node["resources"].get("GPU", 0) >= 1}


# ---------------------------------------------------------------------------------------------
# Cluster launcher (ray up)


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.stem)
def test_launcher_yaml_passes_rays_own_schema(path):
    validate_config(ray_up_view(path))  # raises jsonschema.ValidationError on any schema violation


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: c["available_node_types"]["gpu_worker"].update(min_worker=0), "min_worker"),
        (lambda c: c.update(idle_timeout_minutes="ten"), "ten"),
        (lambda c: c["available_node_types"]["gpu_worker"]["resources"].update(GPU=0.5), "0.5"),
    ],
    ids=["misspelled-key", "wrong-type", "fractional-gpu"],
)
def test_rays_validator_rejects_broken_variants(mutate, message):
    config = load(LAUNCHER_YAMLS[0])
    mutate(config)
    with pytest.raises(jsonschema.ValidationError, match=message):
        validate_config(prepare_config(config))


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.stem)
def test_cpu_head_and_autoscaling_gpu_workers(path):
    config = ray_up_view(path)
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"]["CPU"] == 0, "the head should not take training or attack work"
    gpu_types = gpu_node_types(config)
    assert gpu_types, f"{path.name}: no worker node type with a GPU"
    for name, node in gpu_types.items():
        assert node["min_workers"] == 0 < node["max_workers"] <= config["max_workers"], name
    assert 0 < config["idle_timeout_minutes"] <= 30


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.stem)
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_one_gpu_node_fits_a_train_worker_and_a_sea_actor_of_each_recipe(path, recipe):
    cfg = load_config(recipe)
    for name, node in gpu_node_types(ray_up_view(path)).items():
        cpus, gpus = node["resources"]["CPU"], node["resources"]["GPU"]
        assert cfg.cluster.cpus_per_worker <= cpus and cfg.cluster.gpus_per_worker <= gpus, name
        assert cfg.sea.cpus_per_actor <= cpus and cfg.sea.gpus_per_actor <= gpus, name


def test_workers_use_spot_capacity():
    aws = gpu_node_types(load(CLUSTERS / "aws.yaml"))
    assert all(n["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot" for n in aws.values())
    gcp = gpu_node_types(load(CLUSTERS / "gcp.yaml"))
    for node in gcp.values():
        scheduling = node["node_config"]["scheduling"]
        assert scheduling["provisioningModel"] == "SPOT" and scheduling["onHostMaintenance"] == "TERMINATE"


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.stem)
def test_setup_installs_this_project_from_the_synced_checkout(path):
    config = load(path)
    # `ray up` runs from the repository root, so "." is this checkout.
    mounts = {remote: (REPO / local).resolve() for remote, local in config["file_mounts"].items()
              if not local.startswith("~")}
    project = [remote for remote, local in mounts.items() if local == REPO]
    assert len(project) == 1, f"{path.name}: file_mounts must sync the repository root ('.') once"
    assert (REPO / "pyproject.toml").is_file()
    assert f"pip install -e {project[0]}" in config["setup_commands"]
    assert ".gitignore" in config["rsync_filter"], "rsync must skip git-ignored paths (.venv, .cache, ...)"
    assert ".git" in config["rsync_exclude"]


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.stem)
def test_token_auth_on_every_node(path):
    config = load(path)
    assert config["file_mounts"][TOKEN_FILE] == TOKEN_FILE, "the launcher's token must reach every node"
    assert any(TOKEN_FILE in c and "exit 1" in c for c in config["setup_commands"]), "missing token must stop setup"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [" ".join(c.split()) for c in config[key] if "ray start" in c]
        assert len(starts) == 1 and "RAY_AUTH_MODE=token ray start" in starts[0], key


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.stem)
def test_commands_use_flags_the_installed_clis_have(path):
    from mlflow.cli import server
    from ray.scripts.scripts import start

    def flags(command: str, program: str) -> set[str]:
        tail = command.split(program, 1)[1]
        return {m.split("=")[0] for m in re.findall(r"(?<!\S)--[a-z][a-z0-9-]*(?:=\S+)?", tail)}

    ray_flags = {opt for param in start.params for opt in param.opts}
    for command in start_commands(load(path)):
        assert flags(command, "ray start") <= ray_flags, command
    mlflow_flags = {opt for param in server.params for opt in param.opts}
    mlflow_commands = [" ".join(c.split()) for c in load(path)["head_start_ray_commands"] if "mlflow server" in c]
    assert mlflow_commands
    for command in mlflow_commands:
        assert flags(command, "mlflow server") <= mlflow_flags, command


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.stem)
def test_images_run_the_installed_ray_release(path):
    docker = load(path)["docker"]
    for key in ("image", "head_image"):
        assert docker[key].startswith(f"rayproject/ray:{ray.__version__}-py311"), docker[key]


def test_cluster_image_builds_on_the_installed_ray_release():
    from_line = next(line for line in DOCKERFILE.read_text().splitlines() if line.startswith("FROM "))
    assert from_line == f"FROM rayproject/ray:{ray.__version__}-py311-gpu"


# ---------------------------------------------------------------------------------------------
# KubeRay RayJob


def rayjob() -> dict:
    documents = [d for d in yaml.safe_load_all(RAYJOB.read_text()) if d]
    assert len(documents) == 1
    return documents[0]


def ray_containers(job: dict) -> dict[str, dict]:
    cluster = job["spec"]["rayClusterSpec"]
    found = {"head": cluster["headGroupSpec"]["template"]["spec"]["containers"][0],
             "submitter": job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]}
    for group in cluster["workerGroupSpecs"]:
        found[f"worker:{group['groupName']}"] = group["template"]["spec"]["containers"][0]
    return found


def test_rayjob_has_an_autoscaling_gpu_worker_group():
    job = rayjob()
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    gpu_groups = [g for g in cluster["workerGroupSpecs"]
                  if int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1]
    assert gpu_groups
    for group in gpu_groups:
        assert group["minReplicas"] == 0 < group["maxReplicas"]
    assert job["spec"]["shutdownAfterJobFinishes"] is True


def test_rayjob_token_auth_in_every_container_that_talks_to_ray():
    job = rayjob()
    envs = {name: c["env"] for name, c in ray_containers(job).items()}
    envs["autoscaler"] = job["spec"]["rayClusterSpec"]["autoscalerOptions"]["env"]
    secrets = set()
    for name, env in envs.items():
        by_name = {e["name"]: e for e in env}
        assert by_name["RAY_AUTH_MODE"]["value"] == "token", name
        ref = by_name["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        secrets.add((ref["name"], ref["key"]))
    assert len(secrets) == 1, f"every container must read the same token secret, found {secrets}"
    assert f"kubectl create secret generic {secrets.pop()[0]}" in RAYJOB.read_text()


def test_rayjob_runs_the_image_copy_of_the_project():
    job = rayjob()
    images = {c["image"] for c in ray_containers(job).values()}
    assert len(images) == 1, f"head, workers and submitter must share one image, found {images}"
    workdir = next(line.split()[1] for line in DOCKERFILE.read_text().splitlines() if line.startswith("WORKDIR "))
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])["working_dir"] == workdir


def test_rayjob_entrypoint_is_a_real_script_and_config_that_pass_dry_run(repo_env):
    job = rayjob()
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "python"
    script = REPO / argv[1]
    config = REPO / argv[argv.index("--config") + 1]
    assert script.is_file() and config.is_file()
    overrides = [a for a in argv[argv.index("--config") + 2:] if "=" in a]
    cfg = load_config(config, overrides)
    # Multi-node training needs storage every node reaches.
    assert cfg.sweep.storage_path.startswith(("s3://", "gs://"))
    assert cfg.data.shards.startswith(("s3://", "gs://"))
    group = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    pod_gpus = int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    peak = cfg.cluster.workers * cfg.cluster.gpus_per_worker * cfg.sweep.max_concurrent_trials
    assert peak <= group["maxReplicas"] * pod_gpus, "concurrent trials need more GPUs than the group can scale to"

    result = subprocess.run([PYTHON, *argv[1:], "--dry-run"], cwd=REPO, env=repo_env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"ScalingConfig(num_workers={cfg.cluster.workers}, use_gpu=True" in result.stdout
    assert f"per-worker batch {cfg.train.batch_size // cfg.cluster.workers}" in result.stdout
    assert f"Ray results and checkpoints: {cfg.sweep.storage_path}" in result.stdout


# ---------------------------------------------------------------------------------------------
# Documentation


def _placeholder_keys(node, key: str = "") -> set[str]:
    if isinstance(node, dict):
        return set().union(*(_placeholder_keys(v, k) for k, v in node.items())) if node else set()
    if isinstance(node, list):
        return set().union(*(_placeholder_keys(v, key) for v in node)) if node else set()
    return {key} if isinstance(node, str) and "PLACEHOLDER" in node else set()


@pytest.mark.parametrize("path", [*LAUNCHER_YAMLS, RAYJOB], ids=lambda p: p.name)
def test_docs_name_every_placeholder_to_edit(path):
    docs = DOCS.read_text()
    config = load(path) if path != RAYJOB else rayjob()
    if path == RAYJOB:  # placeholders inside the embedded runtime_env YAML and the entrypoint
        config = copy.deepcopy(config)
        config["spec"]["runtimeEnvYAML"] = yaml.safe_load(config["spec"]["runtimeEnvYAML"])
    keys = _placeholder_keys(config)
    assert keys
    missing = sorted(k for k in keys if f"`{k}`" not in docs)
    assert not missing, f"docs/cluster.md does not say how to fill {missing} of {path.name}"
