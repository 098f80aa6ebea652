"""The PIR-AT per-worker loop: PGD adversarial examples (model in eval mode), then the update (train mode).

`PirAt` is plain PyTorch (usable in any process, e.g. the benchmark's plain loop); the Ray Train worker that
drives it (data, DDP, checkpoints, reports) is `orchestrator.worker.train_loop_per_worker`.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from data.classes import IGNORE_INDEX
from trainables import metrics
from trainables.attacks import apgd, pgd, raise_on_values, value_checks
from trainables.models import build_from_config
from trainables.models.build import ModelSection
from trainables.schedule import warmup_poly
from trainables.units import to_unit


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the trial stops without writing a checkpoint."""


class CheckpointMismatch(ValueError):
    """A checkpoint that does not fit the configured model (another architecture or class count)."""


class AttackSection(Protocol):
    """The training attack's settings (orchestrator.config.TrainAttackConfig); budgets in units of 1/255."""

    steps: int
    eps: float
    step_size: float
    random_start: bool


class TrainSection(Protocol):
    """What PirAt reads from the config's `train` section (orchestrator.config.TrainConfig)."""

    epochs: int
    lr: float
    weight_decay: float
    warmup_epochs: float
    poly_power: float
    precision: str
    channels_last: bool
    grad_clip: float | None
    attack: AttackSection


@dataclass
class StepTimes:
    """Seconds spent per phase of the training step, summed over an epoch."""

    attack: float = 0.0
    forward_backward: float = 0.0
    optimizer: float = 0.0
    data: float = 0.0

    def as_metrics(self) -> dict[str, float]:
        total = self.attack + self.forward_backward + self.optimizer + self.data
        out = {f"time_{k}_s": v for k, v in vars(self).items()}
        out.update({f"frac_{k}": (v / total if total else 0.0) for k, v in vars(self).items()})
        return out


class PhaseClock:
    """Times the phases of training steps: wall clock on a CPU; on a GPU, CUDA events read once when the epoch
    settles, so that the timing adds no host synchronisation to a step."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.pending: list[tuple[str, Any, Any]] = []

    def now(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def add(self, phase: str, start: Any, end: Any) -> None:
        self.pending.append((phase, start, end))

    def settle(self, times: StepTimes) -> None:
        """Add every pending phase's seconds to `times`."""
        if self.cuda and self.pending:
            torch.cuda.synchronize()
        for phase, start, end in self.pending:
            seconds = start.elapsed_time(end) / 1000.0 if self.cuda else end - start
            setattr(times, phase, getattr(times, phase) + seconds)
        self.pending.clear()


@dataclass
class EpochStats:
    loss_sum: float = 0.0
    steps: int = 0
    images: int = 0
    times: StepTimes = field(default_factory=StepTimes)


class PirAt:
    """Model, optimizer, schedule and one adversarial training step, free of any Ray dependency."""

    def __init__(self, train: TrainSection, model: ModelSection, num_classes: int, steps_per_epoch: int,
                 device: torch.device | str = "cpu", network: torch.nn.Module | None = None):
        self.model_config = dict(vars(model))
        self.num_classes = num_classes
        self.device = torch.device(device)
        self.steps_per_epoch = steps_per_epoch
        self.module = (network if network is not None else build_from_config(model, num_classes)).to(self.device)
        self.model = self.module  # replaced by the DDP wrapper in distributed runs
        self.channels_last = bool(train.channels_last) and self.device.type == "cuda"
        if self.channels_last:
            self.module = self.module.to(memory_format=torch.channels_last)
        precision = train.precision
        if precision == "fp16" and self.device.type != "cuda":
            raise ValueError("train.precision = 'fp16' needs a GPU; use 'bf16' or 'fp32' on CPU")
        self.autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")
        self.optimizer = torch.optim.AdamW(self.module.parameters(), lr=train.lr, weight_decay=train.weight_decay)
        total = train.epochs * steps_per_epoch
        warmup = int(round(train.warmup_epochs * steps_per_epoch))
        self.scheduler = warmup_poly(self.optimizer, total_steps=total, warmup_steps=warmup, power=train.poly_power)
        attack = train.attack
        self.attack_steps = int(attack.steps)
        self.eps = to_unit(attack.eps)
        self.step_size = to_unit(attack.step_size)
        self.random_start = bool(attack.random_start)
        self.grad_clip = train.grad_clip
        self.world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    # -- one step -------------------------------------------------------------------------------------

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def adversarial(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """PGD examples at the training ε with the model in eval mode (k = 0: the clean images), and the attack's
        `value_checks` on the device (None without an attack), read by train_epoch with the loss.

        Parameters are frozen meanwhile: the attack needs input gradients only, and DDP's gradient
        hooks must not fire for the attack's backward passes."""
        if self.attack_steps == 0 or self.eps == 0:
            return x, None
        self.module.eval()
        params = [p for p in self.module.parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        try:
            with self._autocast():
                x_adv = pgd(self.module, x, y, eps=self.eps, steps=self.attack_steps, step_size=self.step_size,
                            loss="ce", random_start=self.random_start, ignore_index=IGNORE_INDEX, host_checks=False)
        finally:
            for p in params:
                p.requires_grad_(True)
        return x_adv.detach(), value_checks(x, y, x_adv, self.num_classes, IGNORE_INDEX)

    def step(self, x: torch.Tensor, y: torch.Tensor, clock: PhaseClock) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attack, forward/backward in train mode, optimizer update; returns the loss and the attack's value checks
        (device tensors)."""
        t0 = clock.now()
        x_adv, checks = self.adversarial(x, y)
        t1 = clock.now()
        self.model.train()
        with self._autocast():
            aux_weight = float(getattr(self.module, "aux_weight", 0.0))
            logits, aux = self.model(x_adv, with_aux=True) if aux_weight else (self.model(x_adv), None)
            loss = F.cross_entropy(logits.float(), y, ignore_index=IGNORE_INDEX)
            if aux is not None:  # UPerNet's auxiliary FCN head, weighted as the reference trains it
                loss = loss + aux_weight * F.cross_entropy(aux.float(), y, ignore_index=IGNORE_INDEX)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        t2 = clock.now()
        if self.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        t3 = clock.now()
        clock.add("attack", t0, t1)
        clock.add("forward_backward", t1, t2)
        clock.add("optimizer", t2, t3)
        return loss.detach(), checks

    def _to_device(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x = batch["image"].to(self.device, non_blocking=True)
        y = batch["label"].to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y

    def train_epoch(self, batches: Iterable[dict[str, torch.Tensor]], epoch: int) -> EpochStats:
        """One pass over `batches`; raises TrainingDiverged (on every rank) at the first non-finite loss.

        One host synchronisation per step: the loss and the ranks' non-finite flag are read together."""
        stats = EpochStats()
        clock = PhaseClock(self.device)
        iterator: Iterator = iter(batches)
        while True:
            t0 = time.perf_counter()
            batch = next(iterator, None)
            stats.times.data += time.perf_counter() - t0
            if batch is None:
                break
            x, y = self._to_device(batch)
            loss, checks = self.step(x, y, clock)
            flag = (~torch.isfinite(loss)).to(torch.float64).reshape(1)
            if self.world_size > 1:
                dist.all_reduce(flag)
            read = [loss.double().reshape(1), flag] + ([] if checks is None else [checks])
            value, bad, *values = torch.cat(read).tolist()
            if values:
                raise_on_values(values, self.eps, self.num_classes, "PIR-AT training attack")
            if bad > 0:
                raise TrainingDiverged(
                    f"non-finite training loss at epoch {epoch} step {stats.steps + 1} (loss {value}); "
                    "no checkpoint written for this epoch"
                )
            stats.loss_sum += value
            stats.steps += 1
            stats.images += x.shape[0]
        clock.settle(stats.times)
        return stats

    # -- validation -----------------------------------------------------------------------------------

    @torch.no_grad()
    def _predict(self, x: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return self.module(x).argmax(1)

    def validate(self, batches: Iterable[dict[str, torch.Tensor]], *, proxy_iterations: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0) -> dict[str, float]:
        """Clean mIoU/aAcc and the robust proxy (APGD-CE, few iterations, training ε) on the selection images.

        The selection images are held out of the training split (never the val images that SEA scores), so
        choosing a checkpoint by these numbers does not bias the reported robustness. Rank r takes every
        world_size-th batch; confusion matrices are summed over ranks."""
        self.module.eval()
        if world_size > 1:  # every rank evaluates the checkpointed model: rank 0's BatchNorm statistics
            for buffer in self.module.buffers():
                dist.broadcast(buffer, src=0)
        k = self.num_classes
        clean = torch.zeros(k, k, dtype=torch.long, device=self.device)
        robust = torch.zeros_like(clean)
        proxy_eps = self.eps
        for index, batch in enumerate(batches):
            if index % world_size != rank:
                continue
            x, y = self._to_device(batch)
            clean += metrics.confusion_matrix(self._predict(x), y, k, ignore_index=IGNORE_INDEX)
            if proxy_eps > 0:
                x_adv = apgd(self.module, x, y, eps=proxy_eps, n_iter=proxy_iterations, loss="ce",
                             red_eps=False, ignore_index=IGNORE_INDEX, seed=seed + index)
                robust += metrics.confusion_matrix(self._predict(x_adv), y, k, ignore_index=IGNORE_INDEX)
        if world_size > 1:
            dist.all_reduce(clean)
            dist.all_reduce(robust)
        out = {f"select_clean_{name}": value for name, value in metrics.scores(clean).items()}
        # No budget: robustness at ε = 0 is the clean result.
        robust_scores = metrics.scores(robust if proxy_eps > 0 else clean)
        out.update({f"select_robust_{name}": value for name, value in robust_scores.items()})
        return out

    # -- state ----------------------------------------------------------------------------------------

    def state_dict(self, epoch: int) -> dict[str, Any]:
        """Everything an exact resume needs: model, optimizer, scheduler, scaler, epoch and RNG states."""
        return {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": epoch,
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "numpy": _numpy_rng_state(),
                "python": random.getstate(),
            },
            "num_classes": self.num_classes,
            "model_config": self.model_config,
        }

    def load_state_dict(self, state: dict[str, Any], source: str = "checkpoint") -> int:
        """Restore a state written by `state_dict`; returns the epoch it was taken after."""
        load_model_state(self.module, state, source)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        _set_numpy_rng_state(rng["numpy"])
        random.setstate(rng["python"])
        return int(state["epoch"])


def _numpy_rng_state() -> dict[str, Any]:
    """NumPy's global RNG state as tensors and numbers (a checkpoint must load with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _set_numpy_rng_state(state: dict[str, Any]) -> None:
    np.random.set_state((state["kind"], state["keys"].numpy().astype(np.uint32), state["pos"],
                         state["has_gauss"], state["cached_gaussian"]))


def load_model_state(model: torch.nn.Module, state: dict[str, Any], source: str) -> None:
    """Load a checkpoint's model weights exactly, or fail naming the keys and shapes that differ."""
    weights = state["model"] if "model" in state and isinstance(state["model"], dict) else state
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    shapes = sorted(k for k in set(own) & set(weights) if tuple(own[k].shape) != tuple(weights[k].shape))
    if missing or unexpected or shapes:
        def head(keys, n=8):
            return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing: {head(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected: {head(unexpected)}")
        if shapes:
            parts.append(f"{len(shapes)} with another shape: "
                         + head([f"{k} {tuple(weights[k].shape)} vs {tuple(own[k].shape)}" for k in shapes]))
        saved = state.get("model_config") if isinstance(state, dict) else None
        about = f" (checkpoint model: {saved})" if saved else ""
        raise CheckpointMismatch(f"{source} does not fit the configured model{about}: " + "; ".join(parts))
    model.load_state_dict(weights)


def fingerprint(model: torch.nn.Module) -> str:
    """A short hash of every parameter: equal on all DDP replicas when they are in sync.

    Buffers (BatchNorm running statistics) are left out: each replica updates them from its own batch,
    and DDP broadcasts rank 0's before every forward, so rank 0's are the ones used and checkpointed."""
    digest = hashlib.sha256()
    for name, tensor in model.named_parameters():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def read_state(path: str) -> dict[str, Any]:
    """Read a training state file; weights_only so a checkpoint can never run code."""
    return torch.load(path, map_location="cpu", weights_only=True)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (dropout, drop-path, PGD random starts)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The global generators' seed for one worker's epoch: a resumed run draws what an uninterrupted one does."""
    return seed * 100003 + epoch * 101 + rank


def use_sync_batchnorm(device: torch.device | str, world_size: int) -> bool:
    """BatchNorm statistics over the global batch on several GPUs (a per-GPU batch of 2 is too small for its
    own statistics); CPU/gloo runs keep per-worker BatchNorm."""
    return torch.device(device).type == "cuda" and world_size > 1
