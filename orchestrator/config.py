"""The typed config schema (pydantic v2), YAML loading, `key.path=value` overrides and clear errors.

Every invalid value becomes one line `key.path = value: what is allowed`; callers exit with code 2.
Perturbation budgets (`eps`, `step_size`) are in units of 1/255 here; `trainables.units` converts.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from data.classes import DATASET_CLASSES

UNITS_255 = "units of 1/255"
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "experiments" / "configs" / "demo.yaml"


class ConfigError(ValueError):
    """A config that cannot be used; the message is one line naming key, value and what is allowed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SyntheticData(_Section):
    """Generated dataset in the real VOC/ADE20K layouts (no downloads possible here)."""

    seed: int = 0
    train_images: int = Field(64, ge=1)
    val_images: int = Field(16, ge=1)
    num_classes: int = Field(5, ge=2, description="object classes drawn, background included")
    height: int = Field(375, ge=32)
    width: int = Field(500, ge=32)
    style: Literal["colour", "texture"] = Field(
        "colour", description="colour: classes told by saturated colour (learnt in minutes, robust by "
                              "construction); texture: grey objects told by stripe texture and shape, as easy to "
                              "attack as real images (data/synthetic.py)",
    )


class DataConfig(_Section):
    dataset: Literal["voc", "voc_aug", "ade20k"] = Field(
        "voc_aug", description="layout of the training split; VOC recipes train on voc_aug"
    )
    root: Optional[str] = Field(
        None, description="VOCdevkit/VOC2012 or ADEChallengeData2016 folder; unset with `synthetic`"
    )
    synthetic: Optional[SyntheticData] = None
    shards: str = Field(..., description="URI under which Parquet shards live (train/ and val/)")
    train_split: str = "train"
    val_split: str = "val"
    reduce_zero_label: bool = False
    crop_size: int = Field(473, ge=16)
    val_size: int = Field(473, ge=16)
    scale_range: tuple[float, float] = (0.5, 2.0)
    select_images: int = Field(
        64, ge=1, description="training images held out (their own shard split) to choose checkpoints on, never val"
    )
    shard_rows: int = Field(256, ge=1)

    @field_validator("scale_range")
    @classmethod
    def _scale_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0 < low <= high:
            raise ValueError("must be [low, high] with 0 < low <= high")
        return value

    @model_validator(mode="after")
    def _source(self) -> DataConfig:
        if self.root is None and self.synthetic is None:
            raise ValueError("set data.root (a dataset folder) or data.synthetic (generated data)")
        if self.reduce_zero_label and self.dataset != "ade20k":
            raise ValueError("reduce_zero_label applies to ade20k only")
        return self

    @property
    def val_dataset(self) -> str:
        """VOC recipes train on SBD-aug and validate on VOC val."""
        return "voc" if self.dataset == "voc_aug" else self.dataset

    @property
    def num_classes(self) -> int:
        return len(DATASET_CLASSES[self.dataset]) - (1 if self.reduce_zero_label else 0)


class ModelConfig(_Section):
    decoder: Literal["upernet", "segmenter"] = "upernet"
    backbone: str = "convnext_tiny"
    stem: Literal["patch", "cvst"] = "patch"
    backbone_weights: Optional[str] = Field(
        None, description="URI of a (robust) ImageNet backbone checkpoint: path, file://, s3://, gs://, https://"
    )
    init: Literal["pir", "clean", "random"] = Field(
        "random", description="where the backbone weights came from; logged with every run"
    )
    decoder_width: int = Field(512, ge=8)
    drop_path_rate: float = Field(0.0, ge=0, lt=1, description="stochastic depth of the backbone's blocks (timm)")
    weights: Optional[str] = Field(
        None, description="URI of whole-model weights (published PIR-AT layout or this project's checkpoint), loaded "
                          "strictly; their recorded input normalisation replaces model.input_norm",
    )
    input_norm: Literal["imagenet", "none"] = Field(
        "imagenet", description="imagenet: mean/std normalisation as the model's first layer; none: the backbone "
                                "sees [0, 1] images (the paper's models)",
    )

    init_weights: dict[Literal["pir", "clean"], str] = Field(
        default_factory=dict, description="backbone checkpoint URI per init (the published robust and clean "
                                          "backbones), used when model.backbone_weights is unset; lets init be "
                                          "a sweep dimension on real data",
    )

    @model_validator(mode="after")
    def _weights(self) -> ModelConfig:
        if self.weights and self.backbone_weights:
            raise ValueError("model.weights loads the whole model; drop model.backbone_weights, which it overwrites")
        if self.init == "random" and self.backbone_weights:
            raise ValueError("init 'random' contradicts model.backbone_weights; use init 'pir' or 'clean'")
        return self

    def init_source(self) -> str | None:
        """The backbone checkpoint this init names (backbone_weights, else init_weights[init]); None for random
        init and for an init left to the pretrain stage."""
        if self.init == "random":
            return None
        return self.backbone_weights or self.init_weights.get(self.init)


class PretrainConfig(_Section):
    """The ImageNet stand-ins PIR needs on generated data: a classifier with the model's backbone, trained clean
    (init: clean) and with ℓ∞ PGD (init: pir) on single-object images of the generated classes; cached under
    {sweep.storage_path}/pretrain/{hash of these settings}. Real data takes the published backbones instead."""

    steps: int = Field(600, ge=1, description="optimiser steps of each classifier")
    batch_size: int = Field(32, ge=1)
    image_size: int = Field(64, ge=32, description="square images, a multiple of 32")
    classes: int = Field(8, ge=2, description="object classes (1..classes of the generated data's class list)")
    eps: float = Field(4.0, gt=0, description="the robust classifier's training budget; " + UNITS_255)
    attack_steps: int = Field(2, ge=1, description="PGD steps per batch of the robust classifier")
    eval_eps: float = Field(4.0, gt=0, description="budget of the held-out PGD-10 check; " + UNITS_255)
    lr: float = Field(2e-3, gt=0)
    seed: int = 0

    @field_validator("image_size")
    @classmethod
    def _multiple_of_32(cls, value: int) -> int:
        if value % 32:
            raise ValueError(f"{value}: must be a multiple of 32 (the backbone's stride)")
        return value


class TrainAttackConfig(_Section):
    steps: int = Field(2, ge=0, description="PGD steps k; 0 is clean training")
    eps: float = Field(4.0, ge=0, description=UNITS_255)
    step_size: float = Field(2.55, gt=0, description=UNITS_255 + "; the recipe's 0.01 is 2.55")
    loss: Literal["ce"] = "ce"
    random_start: bool = False


class TrainConfig(_Section):
    epochs: int = Field(50, ge=1)
    batch_size: int = Field(16, ge=1, description="global batch, split across workers")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-2, ge=0)
    warmup_epochs: float = Field(5.0, ge=0)
    poly_power: float = Field(1.0, ge=0)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    channels_last: bool = False
    grad_clip: Optional[float] = Field(None, gt=0)
    val_every: int = Field(1, ge=1, description="epochs between validations on the selection images")
    proxy_iterations: int = Field(10, ge=1, description="APGD-CE iterations of the robust proxy")
    keep_checkpoints: int = Field(2, ge=1, description="best K checkpoints kept, ranked on the selection images")
    seed: int = 0
    attack: TrainAttackConfig = TrainAttackConfig()

    @model_validator(mode="after")
    def _warmup(self) -> TrainConfig:
        if self.warmup_epochs > 0 and self.warmup_epochs >= self.epochs:
            raise ValueError(
                f"train.warmup_epochs ({self.warmup_epochs:g}) must be < train.epochs ({self.epochs}); "
                "a warm-up as long as training never reaches the peak lr"
            )
        return self


SweepValue = Any


class SweepConfig(_Section):
    search: Literal["grid", "random"] = "grid"
    params: dict[str, list[SweepValue]] = Field(
        default_factory=dict, description="config key path -> values (grid) or choices (random)"
    )
    num_samples: int = Field(1, ge=1, description="random: trials drawn; grid: repeats of the grid")
    max_concurrent_trials: int = Field(1, ge=1)
    scheduler: Literal["fifo", "asha"] = Field(
        "fifo", description="fifo: every trial trains to its end; asha: ASHA stops trials whose selection metric "
                            "(the robust proxy on the held-out selection images, never val) trails the others'"
    )
    asha_grace_epochs: int = Field(1, ge=1, description="epochs every trial trains before ASHA may stop it")
    asha_reduction_factor: int = Field(2, ge=2, description="ASHA keeps about 1/factor of the trials at each rung")
    epochs_mode: Literal["separate", "checkpoints"] = Field(
        "separate", description="how train.epochs values in sweep.params are trained: separate (one trial per "
                                "epoch count, each with its own schedule) or checkpoints (the schedule of the "
                                "longest run, scored at intermediate epochs: one trial trains to the largest count "
                                "and SEA scores its checkpoints at the requested epochs, each its own MLflow run)"
    )
    name: str = "pir_at_sweep"
    storage_path: str = Field("ray_results", description="local path, s3:// or gs:// URI")

    @field_validator("params")
    @classmethod
    def _params(cls, value: dict[str, list[SweepValue]]) -> dict[str, list[SweepValue]]:
        for key, values in value.items():
            if key.split(".", 1)[0] == "sweep":
                raise ValueError(f"{key}: the sweep cannot sweep its own settings")
            if not values:
                raise ValueError(f"{key}: needs at least one value")
        return value

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, value: Any) -> Any:
        if isinstance(value, dict) and "asha" in value:
            raise ValueError("asha: renamed; use sweep.scheduler: asha (or fifo)")
        return value


# Names `sea.extra_attacks` and `sea.defense` accept (trainables.attacks.baselines and trainables.defense run them).
EXTRA_ATTACKS = ("fgsm", "ifgsm", "least-likely")
SEA_DEFENSES = ("nlm", "nlm-bpda")


def _names(value: Any, valid: tuple[str, ...], what: str) -> list[str]:
    """A list of distinct names from `valid`: null is none, one name a list of one; else a one-line error."""
    names = [] if value is None else [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"must be null, one of {', '.join(valid)}, or a list of them")
    for name in names:
        if name not in valid:
            raise ValueError(f"{name!r} is not {what}; valid: {', '.join(valid)} (or a list of them; [] for none)")
    if len(set(names)) != len(names):
        raise ValueError(f"lists {what} twice")
    return names


class SeaConfig(_Section):
    eps: list[float] = Field(default_factory=lambda: [4.0, 8.0], description=UNITS_255)
    iterations: int = Field(300, ge=1, description="APGD iterations per loss")
    losses: list[Literal["mce-bal", "mce", "js", "ce", "segpgd", "cospgd", "mask-sph"]] = Field(
        default_factory=lambda: ["mce-bal", "mce", "js", "segpgd", "mask-sph"],
        description="APGD losses of the ensemble; the default is the reference code's four (Mask-CE, SegPGD's "
        "Bal-CE, JS, Mask-Sph) plus Mask-CE-Bal; loss j starts from seed + j",
    )
    track: Literal["ce", "own"] = Field(
        "ce", description="what drives APGD's step sizes and restarts: ce (per-image cross-entropy, as the "
        "reference code; stronger for the masked losses) or own (each attack loss); the gradient is the loss's"
    )
    images: Optional[int] = Field(None, ge=1, description="cap on val images scored (None: all)")
    batch_size: int = Field(8, ge=1)
    min_actors: int = Field(1, ge=1, description="actors the scoring pool starts with")
    max_actors: int = Field(2, ge=1, description="actors the pool grows to while batches are queued (autoscaling; "
                            "never more than the batches can feed, 2 queued per actor)")
    overlap: bool = Field(
        True, description="true: each trial is scored as soon as it finishes, beside the other trials' training "
                          "(the cluster's resources are shared through Ray's scheduler); false: after the last trial"
    )
    cpus_per_actor: float = Field(1.0, gt=0)
    gpus_per_actor: float = Field(0.0, ge=0)
    seed: int = 0
    extra_attacks: list[str] = Field(
        default_factory=list,
        description="baseline attacks of the panoptic seed, each run at every sea.eps on the SEA images and logged "
                    "per trial as extra_{attack}_{miou,aacc,...}_eps{E}: fgsm (one signed-gradient step of ε), ifgsm "
                    "(step 1/255, min(ε + 4, 1.25ε) iterations, ε in 1/255), least-likely (the same schedule, "
                    "descending CE towards each pixel's least likely clean class); [] for none",
    )
    extra_in_worst: bool = Field(
        False, description="true: the extra attacks also join SEA's per-image worst case (sea_{miou,aacc,...}_eps{E}); "
                           "false: they are scored apart and SEA's worst case is its ensemble's alone",
    )
    defense: list[str] = Field(
        default_factory=list,
        description="null, nlm, nlm-bpda or a list of them: the model behind the non-local-means front end (OpenCV's "
                    "coloured NLM, 10/10/7/21) is also scored, clean, under SEA's ensemble and under the extra "
                    "attacks, and logged as defense_{d}_clean_{score}, defense_{d}_sea_..., defense_{d}_extra_...; "
                    "the undefended numbers stay as they are. nlm: the attack points found on the bare model, "
                    "scored through the filter (non-adaptive); nlm-bpda: attacks through the filter with an identity "
                    "gradient (BPDA, the honest evaluation), costing one NLM pass (about 1 s per 473x473 image on a "
                    "CPU core) per attack iteration",
    )
    defense_iterations: Optional[int] = Field(
        None, ge=1, description="APGD iterations per loss of SEA through the nlm-bpda defence (null: sea.iterations); "
                                "nlm reuses the bare model's attack points and runs no attack of its own",
    )

    @field_validator("extra_attacks", mode="before")
    @classmethod
    def _extra_attacks(cls, value: Any) -> list[str]:
        return _names(value, EXTRA_ATTACKS, "an extra attack")

    @field_validator("defense", mode="before")
    @classmethod
    def _defense(cls, value: Any) -> list[str]:
        return _names(value, SEA_DEFENSES, "a defence")

    @field_validator("eps")
    @classmethod
    def _eps(cls, value: list[float]) -> list[float]:
        if not value:
            raise ValueError("must list at least one ε (" + UNITS_255 + ")")
        for e in value:
            if e <= 0:
                raise ValueError(f"every ε must be > 0 ({UNITS_255}), got {e:g}")
        return value

    @field_validator("losses")
    @classmethod
    def _losses(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("must list at least one loss")
        return value

    @model_validator(mode="after")
    def _actors(self) -> SeaConfig:
        if self.min_actors > self.max_actors:
            raise ValueError(f"min_actors ({self.min_actors}) must be <= max_actors ({self.max_actors})")
        return self

    @model_validator(mode="after")
    def _extra_in_worst(self) -> SeaConfig:
        if self.extra_in_worst and not self.extra_attacks:
            raise ValueError("extra_in_worst = true needs attacks in extra_attacks (it is empty); "
                             f"list some of {', '.join(EXTRA_ATTACKS)} or set extra_in_worst: false")
        return self


# What each `eval.protocol` measures: said in its config key, the plan and the summary table.
PROTOCOLS = {
    "reference": "as the paper's code, comparable with its tables: short side resized to data.crop_size "
                 "(bilinear image, nearest label), centre crop, scored there; VOC's 255 borders count as "
                 "background (no pixel ignored); ADE20K keeps class 0 (151 classes)",
    "full": "as the segmentation toolkits: predict on the image resized to fit data.val_size, logits upsampled "
            "to the original label size and scored there; 255 ignored",
}


class EvalConfig(_Section):
    protocol: Literal["reference", "full"] = Field(
        "reference", description="how clean and SEA scores are measured; " + "; ".join(
            f"{name}: {text}" for name, text in PROTOCOLS.items()),
    )
    # experiments/sea_eval.py (SEA as a job of its own) only:
    name: str = Field("sea-eval", description="sea_eval.py: the parent MLflow run's name and the output folder's")
    label: Optional[str] = Field(None, description="sea_eval.py: the model's name in runs and tables "
                                                   "(null: decoder-backbone-stem)")
    block_images: int = Field(16, ge=1, description="sea_eval.py: images per block; each finished block is "
                                                    "written to eval.output at once and --resume skips it")
    output: Optional[str] = Field(None, description="sea_eval.py: URI of the blocks and artifacts "
                                                    "(null: {sweep.storage_path}/sea_eval/{eval.name})")
    examples: list[str] = Field(default_factory=list, description="sea_eval.py: image ids shown in the grid of "
                                                                  "adversarial examples (empty: the first 4)")


class TrackingConfig(_Section):
    uri: Optional[str] = Field(None, description="MLflow tracking URI (sqlite:///..., http://...)")
    experiment: str = "pir-at"
    artifact_location: Optional[str] = Field(
        None, description="artifact URI of a new experiment (e.g. s3://bucket/mlflow); unset: MLflow's default"
    )


class ClusterConfig(_Section):
    address: Optional[str] = Field(None, description="Ray address; unset: RAY_ADDRESS or a local Ray")
    workers: int = Field(1, ge=1, description="Ray Train workers per trial")
    gpus_per_worker: float = Field(0.0, ge=0)
    cpus_per_worker: float = Field(1.0, gt=0)
    cpus_per_data_task: float = Field(
        1.0, gt=0, description="CPUs each Ray Data task that reads and decodes images (training epochs, selection "
        "and SEA images) reserves; below 1 lets them run beside workers and SEA actors that hold fractions of a CPU"
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    max_failures: int = Field(0, ge=-1, description="worker-group restarts per trial; -1: unlimited")


class Config(_Section):
    data: DataConfig
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    sweep: SweepConfig = SweepConfig()
    sea: SeaConfig = SeaConfig()
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()
    cluster: ClusterConfig = ClusterConfig()
    pretrain: Optional[PretrainConfig] = None

    @model_validator(mode="after")
    def _init(self) -> Config:
        model, synthetic = self.model, self.data.synthetic
        if self.pretrain is not None and synthetic is None:
            raise ValueError("pretrain makes backbones for generated data (data.synthetic); with real data remove it "
                             "and name the published robust and clean backbones in model.init_weights")
        if model.init in ("pir", "clean") and model.init_source() is None and self.pretrain is None:
            raise ValueError(f"model.init {model.init!r} needs a backbone checkpoint: model.backbone_weights, "
                             f"model.init_weights.{model.init}, or (generated data) a pretrain section")
        if self.pretrain is not None and self.pretrain.classes < synthetic.num_classes - 1:
            raise ValueError(f"pretrain.classes = {self.pretrain.classes}: must cover the generated data's "
                             f"{synthetic.num_classes - 1} object classes (data.synthetic.num_classes - 1)")
        return self

    @model_validator(mode="after")
    def _batch(self) -> Config:
        if self.train.batch_size % self.cluster.workers:
            raise ValueError(
                f"train.batch_size ({self.train.batch_size}) must divide evenly across "
                f"cluster.workers ({self.cluster.workers})"
            )
        return self

    @model_validator(mode="after")
    def _protocol(self) -> Config:
        if self.eval.protocol == "reference" and self.data.reduce_zero_label:
            raise ValueError(
                "eval.protocol = 'reference' scores ADE20K with class 0 kept (151 classes, no pixel ignored), "
                "which data.reduce_zero_label = true removes; set eval.protocol: full or data.reduce_zero_label: false"
            )
        return self

    @property
    def per_worker_batch(self) -> int:
        return self.train.batch_size // self.cluster.workers


# ---------------------------------------------------------------------------------------------
# Loading, overrides and error messages


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, float):
        return f"{value:g}"
    if value is None:
        return "null"
    return str(value)


def _section_of(annotation: Any) -> type[BaseModel] | None:
    """The config section class behind an annotation (also inside Optional[...]), if any."""
    for candidate in getattr(annotation, "__args__", (annotation,)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _walk(loc: tuple) -> tuple[type[BaseModel] | None, Any]:
    """(section class holding the last key, FieldInfo of the last key) for a location in the schema."""
    model: type[BaseModel] | None = Config
    info = None
    for part in loc:
        if isinstance(part, int):
            continue
        if model is None:
            return None, None
        parent, info = model, model.model_fields.get(part)
        if info is None:
            return parent, None
        model = _section_of(info.annotation)
    return parent if loc else Config, info


def _field_info(loc: tuple):
    return _walk(loc)[1]


def _valid_keys(loc: tuple) -> list[str]:
    parent, _ = _walk(loc)
    return sorted(parent.model_fields) if parent is not None else []


_ALLOWED = {
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "int_type": "must be an integer",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "dict_type": "must be a mapping of keys to values",
    "tuple_type": "must be a list",
    "model_type": "must be a mapping of keys to values",
    "too_short": "has too few items",
    "too_long": "has too many items",
}


def _format_error(error: dict) -> str:
    loc = tuple(p for p in error["loc"] if not (isinstance(p, str) and p.startswith(("function-", "literal["))))
    # Union members (e.g. Optional[SyntheticData]) add their class name to the location.
    loc = tuple(p for p in loc if not (isinstance(p, str) and p[:1].isupper()))
    path = ".".join(str(p) for p in loc) or "<config>"
    kind = error["type"]
    ctx = error.get("ctx") or {}
    value = error.get("input")
    if kind == "extra_forbidden":
        valid = _valid_keys(loc)
        hint = f"; valid keys here: {', '.join(valid)}" if valid else ""
        return f"{path}: unknown key{hint}"
    if kind == "missing":
        return f"{path}: missing (required)"
    info = _field_info(loc)
    units = f" ({UNITS_255})" if info is not None and UNITS_255 in (info.description or "") else ""
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        op = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}[kind]
        bound = next(iter(ctx.values()))
        allowed = f"must be {op} {_describe(bound)}{units}"
    elif kind in ("literal_error", "enum"):
        allowed = f"must be one of {ctx.get('expected', '')}".replace("'", "")
    elif kind == "value_error":
        allowed = str(ctx.get("error", error["msg"]))
    elif kind in _ALLOWED:
        allowed = _ALLOWED[kind] + units
    else:
        allowed = error["msg"]
    if isinstance(value, dict) and kind in ("value_error", "model_type", "dict_type"):
        return f"{path}: {allowed}"
    return f"{path} = {_describe(value)}: {allowed}"


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn `a.b=value` strings into {path: YAML-parsed value}; malformed ones raise ConfigError."""
    parsed: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r}: expected key.path=value, e.g. train.epochs=3")
        try:
            parsed[key] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            parsed[key] = raw
    return parsed


def set_path(tree: dict[str, Any], path: str, value: Any) -> None:
    """Set tree[a][b][c] = value for path 'a.b.c', creating mappings on the way."""
    node = tree
    parts = path.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{path}: {part} = {_describe(child)} is not a section, cannot set a key under it")
        node = child
    node[parts[-1]] = value


def validate(raw: dict[str, Any]) -> Config:
    """Validate a plain mapping into a Config, raising ConfigError with the first problem on one line."""
    if not isinstance(raw, dict):
        raise ConfigError(f"<config>: must be a mapping of sections, got {_describe(raw)}")
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc.errors()[0])) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a config file into a plain mapping; a missing or malformed file is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    return raw or {}


def load_config(path: str | Path = DEFAULT_CONFIG, overrides: list[str] | None = None) -> Config:
    """Load a YAML config, apply `key.path=value` overrides, validate; ConfigError on any problem."""
    raw = read_yaml(path)
    for key, value in parse_overrides(overrides or []).items():
        set_path(raw, key, value)
    try:
        return validate(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _absolute_uri(value: str | None, base: Path) -> str | None:
    if value is None or "://" in value:
        return value
    return str((base / value).resolve())


def resolve_paths(config: Config, base: str | Path) -> Config:
    """Make local paths absolute (against `base`, the working directory) so every Ray worker finds them;
    URIs (s3://, gs://, file://, https://) stay as they are."""
    base = Path(base)
    raw = to_dict(config)
    raw["data"]["shards"] = _absolute_uri(raw["data"]["shards"], base)
    raw["data"]["root"] = _absolute_uri(raw["data"]["root"], base)
    raw["model"]["backbone_weights"] = _absolute_uri(raw["model"]["backbone_weights"], base)
    raw["model"]["init_weights"] = {k: _absolute_uri(v, base) for k, v in raw["model"]["init_weights"].items()}
    weights = raw["model"]["weights"]  # an MLflow run id (runs:/<id> or 32 hex digits) is not a path
    run_id = weights and (weights.startswith("runs:/")
                          or (len(weights) == 32 and set(weights) <= set("0123456789abcdef")))
    if not run_id:
        raw["model"]["weights"] = _absolute_uri(weights, base)
    raw["sweep"]["storage_path"] = _absolute_uri(raw["sweep"]["storage_path"], base)
    return validate(raw)


def to_dict(config: Config) -> dict[str, Any]:
    """Plain, YAML-safe mapping of a config (the resolved config logged with each run)."""
    return config.model_dump(mode="json")


def with_values(config: Config, values: dict[str, Any]) -> Config:
    """A copy of `config` with `key.path -> value` applied (a sweep trial's config), validated."""
    raw = copy.deepcopy(to_dict(config))
    for key, value in values.items():
        set_path(raw, key, value)
    return validate(raw)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, path + "."))
        else:
            flat[path] = value
    return flat
