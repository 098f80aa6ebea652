"""Cluster configs: the launcher YAMLs pass Ray's own schema, autoscale GPU workers, install the project
and turn on token auth; the KubeRay RayJob runs a real script and config that pass --dry-run; the MLflow
server of every setup requires authentication and no secret is written into a configuration file."""

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

from orchestrator import mlflow_auth
from orchestrator.config import load_config
from orchestrator.redact import is_secret_key

from .conftest import PYTHON, REPO

CLUSTERS = REPO / "experiments" / "clusters"
LAUNCHER_YAMLS = [CLUSTERS / "aws.yaml", CLUSTERS / "gcp.yaml"]
RAYJOB = CLUSTERS / "kuberay-rayjob.yaml"
MLFLOW_MANIFEST = CLUSTERS / "kuberay-mlflow.yaml"
DOCKERFILE = CLUSTERS / "Dockerfile"
DOCS = REPO / "docs" / "cluster.md"
RECIPES = sorted(p for p in (REPO / "experiments" / "configs").glob("*.yaml") if p.stem != "demo")
TOKEN_FILE = "~/.ray/auth_token"
MLFLOW_SECRET_FILE = "~/.pir-at-ray/mlflow_password"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


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
# Security: the MLflow server requires authentication, and no configuration file holds a secret


def launcher_commands(config: dict) -> list[str]:
    """Every shell command of a launcher config (top-level and per node type), whitespace-normalised."""
    lists = [config.get(k) or [] for k in config if k.endswith("_commands")]
    for node in config["available_node_types"].values():
        lists += [node.get(k) or [] for k in node if k.endswith("_commands")]
    return [" ".join(c.split()) for commands in lists for c in commands]


def mlflow_wrapper_args(command: str) -> list[str]:
    """The arguments of `python -m orchestrator.mlflow_auth` in a shell command, up to a redirection."""
    tokens = shlex.split(command.split("-m orchestrator.mlflow_auth", 1)[1])
    end = next((i for i, t in enumerate(tokens) if t[:1] in (">", "&", ")") or t[:2] in ("2>", "1>")), len(tokens))
    return tokens[:end]


def server_host(args: list[str]) -> str:
    """The interface an `mlflow server` argv binds (MLflow's default is 127.0.0.1)."""
    for i, arg in enumerate(args):
        if arg in ("--host", "-h") and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--host="):
            return arg.split("=", 1)[1]
    return "127.0.0.1"


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.stem)
def test_launcher_mlflow_server_is_never_reachable_without_authentication(path):
    servers = [c for c in launcher_commands(load(path)) if re.search(r"\bmlflow (server|ui)\b", c)]
    assert servers, f"{path.name}: no MLflow server command"
    for command in servers:
        argv = shlex.split(command.split("mlflow server", 1)[1].split(">", 1)[0])
        if server_host(argv) in LOOPBACK:
            continue
        # Listening beyond loopback: only MLflow's basic-auth app, started by the wrapper that sets its
        # admin password from the mounted secret (MLflow's own default would refuse to start or be known).
        assert "-m orchestrator.mlflow_auth serve" in command, command
        args = mlflow_auth.build_parser().parse_args(mlflow_wrapper_args(command))
        assert args.action == "serve" and args.secret_file == MLFLOW_SECRET_FILE, command
        assert args.command[0] == "--"
        mlflow_auth.check_server_command(args.command[1:])  # raises unless `mlflow server --app-name basic-auth`
        assert "--disable-security-middleware" not in command and "--allowed-hosts '*'" not in command


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.stem)
def test_every_node_authenticates_to_mlflow_with_the_mounted_secret(path):
    config = load(path)
    assert config["file_mounts"][MLFLOW_SECRET_FILE] == MLFLOW_SECRET_FILE, "the secret must reach every node"
    assert any(MLFLOW_SECRET_FILE in c and "exit 1" in c for c in config["setup_commands"]), \
        "a missing MLflow secret must stop setup"
    exports = (f"export MLFLOW_TRACKING_USERNAME={mlflow_auth.DEFAULT_USERNAME};",
               f'export MLFLOW_TRACKING_PASSWORD="$(cat {MLFLOW_SECRET_FILE})";')
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [" ".join(c.split()) for c in config[key] if "ray start" in c]
        assert len(starts) == 1, key
        head, _ = starts[0].split("ray start", 1)
        assert all(e in head for e in exports), f"{key}: Ray's processes must inherit the MLflow credentials"


SECRET_ASSIGNMENT = re.compile(r"\b([A-Z][A-Z0-9_]*)=(\"\$\(cat [^)]*\)\"|\S+)")
FROM_FILE = re.compile(r"\"\$\(cat [^)\s]+\)\"")


# What a run writes into the checkout (MLflow artifacts, Ray results, data caches): not the repository's files.
GENERATED = {".venv", ".cache", "mlruns", "mlartifacts", "ray_results"}


def repository_yamls() -> list[Path]:
    """The YAML files of the repository: tracked or new and not ignored (`git ls-files`), so that what a demo or a
    test run wrote into the checkout (e.g. mlruns/*/artifacts/config.yaml) neither adds tests nor hides any;
    outside a git checkout, every YAML file but those under the generated folders."""
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z", "--",
                                 "*.yaml", "*.yml"], cwd=REPO, capture_output=True, check=True).stdout
        paths = [REPO / name for name in listed.decode().split("\0") if name]
    except (OSError, subprocess.CalledProcessError):
        paths = [p for p in REPO.rglob("*.y*ml") if not GENERATED.intersection(p.relative_to(REPO).parts)]
    return sorted(p for p in paths if p.suffix in (".yaml", ".yml") and p.is_file())


def _strings(node):
    if isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)
    elif isinstance(node, str):
        yield node


def _env_lists(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "env" and isinstance(value, list):
                yield value
            yield from _env_lists(value)
    elif isinstance(node, list):
        for value in node:
            yield from _env_lists(value)


@pytest.mark.parametrize("path", repository_yamls(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_secret_value_in_a_repository_yaml(path):
    text = path.read_text()
    assert "password1234" not in text and "admin_password" not in text
    documents = [d for d in yaml.safe_load_all(text) if d is not None]
    for string in _strings(documents):
        # Shell: a secret-named variable gets its value from a file at run time, never inline.
        for name, value in SECRET_ASSIGNMENT.findall(string):
            if is_secret_key(name) and not name.endswith(("_MODE", "_PATH", "_FILE")):
                assert FROM_FILE.fullmatch(value), f"{path.name}: {name} is set inline"
        if "env_vars:" in string:  # an embedded runtime_env, which the Ray dashboard shows
            env_vars = yaml.safe_load(string).get("env_vars") or {}
            assert not [k for k in env_vars if is_secret_key(k)], f"{path.name}: secret in a runtime env"
    for env in _env_lists(documents):
        for entry in env:
            if is_secret_key(entry["name"]) and not entry["name"].endswith("_MODE"):
                assert "value" not in entry and "secretKeyRef" in entry["valueFrom"], (path.name, entry["name"])


def manifest() -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all(MLFLOW_MANIFEST.read_text()) if d}


def test_kuberay_mlflow_server_requires_authentication_and_stays_inside_the_cluster():
    docs = manifest()
    assert set(docs) == {"PersistentVolumeClaim", "Deployment", "Service"}
    service = docs["Service"]
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP", "never a LoadBalancer or NodePort"
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    argv = container["command"]
    assert argv[:3] == ["python", "-m", "orchestrator.mlflow_auth"]
    args = mlflow_auth.build_parser().parse_args(argv[3:])
    server = mlflow_auth.check_server_command(args.command[1:])
    assert server_host(server) == "0.0.0.0"
    port = service["spec"]["ports"][0]["port"]
    assert f"{service['metadata']['name']}:{port}" in server[server.index("--allowed-hosts") + 1].split(",")
    # The secret file is the mounted Kubernetes secret, the same the RayJob's pods read.
    mount = next(m for m in container["volumeMounts"] if args.secret_file.startswith(m["mountPath"] + "/"))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    secret_key = args.secret_file.rsplit("/", 1)[1]
    assert (volume["secret"]["secretName"], secret_key) == mlflow_password_ref()
    assert f"kubectl create secret generic {volume['secret']['secretName']} --from-file={secret_key}=" in \
        MLFLOW_MANIFEST.read_text()
    assert container["image"] == ray_containers(rayjob())["head"]["image"]
    assert any(d.replace(" ", "").startswith("mlflow[auth]") for d in project_dependencies()), \
        "the image must install MLflow's basic-auth app (mlflow[auth])"


def mlflow_password_ref() -> tuple[str, str]:
    """(secret name, key) of MLFLOW_TRACKING_PASSWORD, the same in every RayJob container that runs project code."""
    refs = set()
    for name, container in ray_containers(rayjob()).items():
        if name == "submitter":
            continue
        env = {e["name"]: e for e in container["env"]}
        assert env["MLFLOW_TRACKING_USERNAME"]["value"] == mlflow_auth.DEFAULT_USERNAME, name
        ref = env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]
        refs.add((ref["name"], ref["key"]))
    assert len(refs) == 1, refs
    return refs.pop()


def test_rayjob_logs_to_the_authenticated_server_with_the_secret():
    job = rayjob()
    secret = mlflow_password_ref()
    assert secret[0] != "pir-at-ray-token", "the MLflow password and the Ray token are different secrets"
    service = manifest()["Service"]
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == \
        f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"


def project_dependencies() -> list[str]:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]


# ---------------------------------------------------------------------------------------------
# Documentation


def _placeholder_keys(node, key: str = "") -> set[str]:
    if isinstance(node, dict):
        return set().union(*(_placeholder_keys(v, k) for k, v in node.items())) if node else set()
    if isinstance(node, list):
        return set().union(*(_placeholder_keys(v, key) for v in node)) if node else set()
    return {key} if isinstance(node, str) and "PLACEHOLDER" in node else set()


@pytest.mark.parametrize("path", [*LAUNCHER_YAMLS, RAYJOB, MLFLOW_MANIFEST], ids=lambda p: p.name)
def test_docs_name_every_placeholder_to_edit(path):
    docs = DOCS.read_text()
    config = {RAYJOB: rayjob, MLFLOW_MANIFEST: manifest}.get(path, lambda: load(path))()
    if path == RAYJOB:  # placeholders inside the embedded runtime_env YAML and the entrypoint
        config = copy.deepcopy(config)
        config["spec"]["runtimeEnvYAML"] = yaml.safe_load(config["spec"]["runtimeEnvYAML"])
    keys = _placeholder_keys(config)
    assert keys
    missing = sorted(k for k in keys if f"`{k}`" not in docs)
    assert not missing, f"docs/cluster.md does not say how to fill {missing} of {path.name}"
