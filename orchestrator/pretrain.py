"""The job's pretrain stage: the robust (init: pir) and clean (init: clean) backbones that generated data needs in
place of the published ImageNet ones, trained once as Ray tasks beside the sweep (a trial waits for its own init's
backbone only), cached under the storage path by a hash of their settings, and logged as an MLflow run of their own."""

from __future__ import annotations

import hashlib
import json
import threading
from typing import Any

from data import shards
from orchestrator.config import Config
from orchestrator.redact import redact, say

# Bump when the pretraining's arithmetic changes, so that earlier cached backbones are not reused.
VERSION = 1
FILES = {"pir": "robust.pt", "clean": "clean.pt"}
RUN_TAG = "pretrain_hash"
LAYOUT = "normalize"


def settings(config: Config) -> dict[str, Any]:
    """Everything the pretrained weights depend on."""
    return {"version": VERSION, "pretrain": config.pretrain.model_dump(), "backbone": config.model.backbone,
            "stem": config.model.stem, "style": config.data.synthetic.style, "layout": LAYOUT}


def pretrain_key(config: Config) -> str:
    return hashlib.sha256(json.dumps(settings(config), sort_keys=True).encode()).hexdigest()[:12]


def pretrain_uri(config: Config) -> str:
    return shards.join(config.sweep.storage_path, f"pretrain/{pretrain_key(config)}")


def resolve_backbone(config: Config) -> Config:
    """The config with model.backbone_weights set to the checkpoint its init loads when none is named:
    model.init_weights[init], else the pretrain stage's; otherwise the config itself."""
    model = config.model
    if model.init == "random" or model.weights or model.backbone_weights:
        return config
    uri = model.init_source()
    if uri is None and config.pretrain is not None:
        uri = shards.join(pretrain_uri(config), FILES[model.init])
    return config.model_copy(update={"model": model.model_copy(update={"backbone_weights": uri})})


def is_cached(uri: str) -> bool:
    """A pretrain checkpoint written whole: its summary is written after it, so the summary marks it complete."""
    return shards.exists(uri) and shards.exists(uri + ".json")


def needed(configs: list[Config]) -> dict[str, Config]:
    """The pretrain checkpoints these (resolved) trial configs load: URI -> a config that makes it."""
    out = {}
    for config in configs:
        if config.pretrain is None or config.model.init == "random":
            continue
        uri = shards.join(pretrain_uri(config), FILES[config.model.init])
        if config.model.backbone_weights == uri:
            out[uri] = config
    return out


def _train_one(config_dict: dict, init: str, threads: int, device: str) -> dict:
    """Train, save and check one classifier (runs in a Ray task); returns its summary."""
    import io

    import numpy as np
    import torch

    from data.synthetic import object_images
    from orchestrator.config import validate
    from trainables.pretrain import classifier, layout_state, train_classifier
    from trainables.units import to_unit

    config = validate(config_dict)
    pre, style = config.pretrain, config.data.synthetic.style
    torch.set_num_threads(threads)
    torch.manual_seed(pre.seed)
    rng = np.random.default_rng([pre.seed, 1])
    target = torch.device(device)

    def sample(count: int, generator: np.random.Generator = rng) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = object_images(generator, count, pre.classes, pre.image_size, style)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)
        return x.to(target), torch.from_numpy(labels).to(target)

    model = classifier(config.model.backbone, config.model.stem, pre.classes).to(target)
    eps = to_unit(pre.eps) if init == "pir" else 0.0
    tag = f"pretrain {init}"
    result = train_classifier(model, sample, sample(256, np.random.default_rng([pre.seed, 2])), steps=pre.steps,
                              batch_size=pre.batch_size, eps=eps, attack_steps=pre.attack_steps,
                              eval_eps=to_unit(pre.eval_eps), lr=pre.lr, log=lambda line: say(f"{tag}: {line}"))
    buffer = io.BytesIO()
    torch.save(layout_state(result.model.model, LAYOUT), buffer)
    uri = shards.join(pretrain_uri(config), FILES[init])
    summary = {"init": init, "uri": uri, "eps_255": pre.eps if init == "pir" else 0.0, "eval_eps_255": pre.eval_eps,
               "clean_accuracy": result.clean_accuracy, "pgd_accuracy": result.pgd_accuracy,
               "chance": 1 / pre.classes, "seconds": result.seconds, "key": pretrain_key(config),
               "settings": settings(config)}
    shards.write_bytes(uri, buffer.getvalue())  # the checkpoint first: its summary marks it complete
    shards.write_bytes(uri + ".json", json.dumps(summary, indent=2).encode())
    return summary


class Backbones:
    """The pretrain checkpoints of a job: those reused from the cache, and those being trained as Ray tasks.
    Trials wait for their own backbone (`refs`), so trials of one init train while the other's is still made."""

    def __init__(self, summaries: list[dict], pending: dict[str, Any]):
        self.summaries = list(summaries)
        self.pending = dict(pending)  # uri -> ObjectRef of the task writing it
        self.failures: dict[str, str] = {}  # both filled by the watcher, read after it has ended
        self._watcher = threading.Thread(target=self._watch, name="pretrain-watcher", daemon=True)
        if self.pending:
            self._watcher.start()

    def refs(self) -> dict[str, Any]:
        """Backbone URI -> the Ray task writing it (what a trial waits on before it trains)."""
        return dict(self.pending)

    def _watch(self) -> None:
        """Say each backbone's scores the moment its task ends (the job goes on with the trials meanwhile)."""
        import ray

        uris = {ref: uri for uri, ref in self.pending.items()}
        while uris:
            (ref,), _ = ray.wait(list(uris), num_returns=1)
            uri = uris.pop(ref)
            try:
                summary = ray.get(ref)
            except Exception as exc:  # the trials that wait on it fail with the same error
                self.failures[uri] = str(exc).strip().splitlines()[-1][:500] if str(exc).strip() else repr(exc)
                say(f"pretrain: {uri} failed: {self.failures[uri]}")
                continue
            say(f"pretrain: wrote {summary['uri']} in {summary['seconds']:.0f}s: clean accuracy "
                f"{summary['clean_accuracy']:.3f}, PGD-10 accuracy at {summary['eval_eps_255']:g}/255 "
                f"{summary['pgd_accuracy']:.3f} (chance {summary['chance']:.3f})")
            self.summaries.append(summary)

    def finish(self, tracker) -> list[dict]:
        """Wait for every task, log each settings' scores as an MLflow run; returns the summaries. Raises when a
        backbone could not be made (after logging the others)."""
        if self._watcher.ident is not None:  # started: some backbones were being trained
            self._watcher.join()
        for key, group in _by_key(self.summaries).items():
            _log_run(tracker, key, group)
        if self.failures:
            raise RuntimeError("pretrain: " + "; ".join(f"{uri}: {m}" for uri, m in self.failures.items()))
        return self.summaries


def start_backbones(configs: list[Config]) -> Backbones:
    """Start a Ray task for every pretrain checkpoint these trial configs load that is not cached yet (a cached
    one is reused, and said so). Each task reserves what a training worker does (cluster.cpus_per_worker), so a
    trial whose backbone is ready trains beside the other's pretraining."""
    import ray

    todo, summaries = [], []
    for uri, config in needed(configs).items():
        if is_cached(uri):
            summary = json.loads(shards.read_bytes(uri + ".json"))
            say(f"pretrain: reusing {uri} (cached; settings hash {pretrain_key(config)}): clean accuracy "
                f"{summary['clean_accuracy']:.3f}, PGD-10 accuracy {summary['pgd_accuracy']:.3f}")
            summaries.append(summary)
        else:
            todo.append((uri, config))
    pending = {}
    if todo:
        cluster = todo[0][1].cluster
        threads = max(1, int(cluster.cpus_per_worker))
        device = "cuda" if cluster.gpus_per_worker > 0 else "cpu"
        task = ray.remote(num_cpus=cluster.cpus_per_worker, num_gpus=cluster.gpus_per_worker)(_train_one)
        say(f"pretrain: training {len(todo)} backbone(s) ({', '.join(u for u, _ in todo)}) as Ray tasks; "
            "each trial starts training once its init's backbone is written")
        pending = {uri: task.remote(config.model_dump(mode="json"), config.model.init, threads, device)
                   for uri, config in todo}
    return Backbones(summaries, pending)


def ensure_backbones(configs: list[Config], tracker) -> list[dict]:
    """Make every pretrain checkpoint these trial configs load and wait for them; log their scores to MLflow."""
    return start_backbones(configs).finish(tracker)


def _by_key(summaries: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for summary in summaries:
        groups.setdefault(summary["key"], []).append(summary)
    return groups


def _log_run(tracker, key: str, summaries: list[dict]) -> None:
    """One MLflow run per pretrain settings (in the sweep's experiment, tagged with the hash); not logged again
    when the experiment has it with these checkpoints already."""
    client = tracker.client
    experiment = tracker.experiment_id
    found = client.search_runs([experiment], filter_string=f"tags.{RUN_TAG} = '{key}'")
    inits = sorted(s["init"] for s in summaries)
    for run in found:
        if all(f"{init}_clean_accuracy" in run.data.metrics for init in inits):
            say(f"pretrain: MLflow run {run.info.run_id} holds these backbones' scores")
            return
    run_id = found[0].info.run_id if found else client.create_run(
        experiment, run_name=f"pretrain-{key}", tags={RUN_TAG: key}).info.run_id
    flat = {f"pretrain.{k}": str(v) for k, v in summaries[0]["settings"]["pretrain"].items()}
    flat.update({k: str(summaries[0]["settings"][k]) for k in ("backbone", "stem", "style", "layout", "version")})
    existing = client.get_run(run_id).data.params
    for name, value in flat.items():
        if name not in existing:
            client.log_param(run_id, name, value)
    for summary in summaries:
        init = summary["init"]
        for metric in ("clean_accuracy", "pgd_accuracy", "seconds"):
            client.log_metric(run_id, f"{init}_{metric}", float(summary[metric]))
        client.set_tag(run_id, f"{init}_checkpoint", redact(summary["uri"]))
    client.set_terminated(run_id, status="FINISHED")
