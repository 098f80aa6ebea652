"""Names and values of the scores this project logs: metric keys (ε in units of 1/255, `trainables.units.eps_label`),
numbers as fractions in [0, 1], and the groups of final scores (SEA's, the extra attacks', each defence's)."""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping
from typing import Any

from trainables.units import eps_label

_BAD_METRIC_CHARS = re.compile(r"[^\w.\- /:]")
FRACTION_SCORES = ("miou", "aacc", "macc", "miou_greedy", "miou_by_acc")
# SEA's worst-case mIoU: the strongest valid number (the headline) and the paper's greedy walk.
SEA_MIOU, SEA_MIOU_GREEDY = "sea_miou_eps", "sea_miou_greedy_eps"
# Groups of final scores (`score_group`): SEA's, the extra attacks' apart, and each defence's two.
SEA_GROUP, EXTRA_GROUP = "sea", "extra"
_GROUP = re.compile(rf"{EXTRA_GROUP}|defense_(?P<defense>.+)_(?:{SEA_GROUP}|{EXTRA_GROUP})")


def metric_key(name: str) -> str:
    """A metric name MLflow accepts: characters outside letters, digits, _ - . / : and space become '_'."""
    return _BAD_METRIC_CHARS.sub("_", str(name))


def as_number(value: Any) -> float | None:
    """A real number (Python, NumPy, or a one-element array/tensor) as float; None for anything else, bools too."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    item = getattr(value, "item", None)
    numel = getattr(value, "numel", None)
    count = numel() if callable(numel) else getattr(value, "size", None)
    if not callable(item) or count != 1:
        return None
    inner = item()
    if isinstance(inner, bool) or not isinstance(inner, numbers.Real):
        return None
    return float(inner)


def _score(name: str, score: str, value: Any) -> float:
    """A logged score; mIoU/aAcc/mAcc must be fractions in [0, 1] (NaN allowed), so percent is an error."""
    number = as_number(value)
    if number is None:
        raise ValueError(f"{name} = {value!r}: must be a number")
    if score in FRACTION_SCORES and not math.isnan(number) and not -1e-9 <= number <= 1 + 1e-9:
        raise ValueError(f"{name} = {number:g}: scores are logged as fractions in [0, 1], not percent")
    return number


def score_group(kind: str, defense: str | None = None) -> str:
    """The metric prefix of a group of scores: `sea` (SEA's ensemble and worst case) or `extra` (the extra
    attacks, scored apart), and `defense_{d}_sea` / `defense_{d}_extra` for the model behind defence d."""
    if kind not in (SEA_GROUP, EXTRA_GROUP):
        raise ValueError(f"score group kind = {kind!r}; valid: {SEA_GROUP!r}, {EXTRA_GROUP!r}")
    return kind if defense is None else f"defense_{defense}_{kind}"


def _group_metrics(group: str, by_eps: Mapping[float, Mapping[str, Mapping[str, Any]]]) -> dict[str, float]:
    """A group's metrics per ε: a SEA group logs its worst case, each attack and its clean images; an extra
    group (its clean and worst are its SEA group's clean and not asked for) each attack only."""
    metrics: dict[str, float] = {}
    extra = group.endswith(EXTRA_GROUP)
    for eps in sorted(by_eps, key=float):
        label = eps_label(float(eps))
        scores = by_eps[eps]
        if not extra and "worst" not in scores:
            raise ValueError(f"{group}[{label}] has no 'worst' entry (keys: {sorted(scores)}); pass the dict "
                             "returned by trainables.attacks.aggregate")
        for name, values in scores.items():
            if not isinstance(values, Mapping):
                raise ValueError(f"{group}[{label}][{name!r}] = {values!r}: must be a mapping like {{'miou': ...}}")
            if extra and name in ("worst", "clean"):
                continue
            for score, value in values.items():
                if as_number(value) is None:
                    continue
                if name == "worst":
                    key = f"{group}_{score}_eps{label}"
                else:
                    key = f"{group}_{name}_{score}_eps{label}"
                metrics[metric_key(key)] = _score(f"{group}[{label}][{name!r}][{score!r}]", score, value)
    return metrics


def final_metrics(clean: Mapping[str, Any], sea: Mapping[float, Mapping[str, Mapping[str, Any]]],
                  train_hours: float, attack_hours: float,
                  groups: Mapping[str, Mapping[float, Mapping[str, Mapping[str, Any]]]] | None = None,
                  ) -> dict[str, float]:
    """The final metric names and values of a trial (see SweepTracker.log_result); `groups` holds the scores
    beside SEA's (`score_group` names: extra, defense_{d}_sea, defense_{d}_extra), each as `sea` is."""
    metrics: dict[str, float] = {}
    for key, value in clean.items():
        if as_number(value) is not None:
            metrics[metric_key(f"clean_{key}")] = _score(f"clean[{key!r}]", key, value)
    metrics.update(_group_metrics(SEA_GROUP, sea))
    for group, by_eps in (groups or {}).items():
        if group == SEA_GROUP or not _GROUP.fullmatch(group):
            raise ValueError(f"score group {group!r}: must be {EXTRA_GROUP!r}, 'defense_{{d}}_{SEA_GROUP}' or "
                             f"'defense_{{d}}_{EXTRA_GROUP}'")
        metrics.update(_group_metrics(group, by_eps))
        if group.endswith("_" + SEA_GROUP) and by_eps:  # the defended model's clean scores, as clean_* are
            first = by_eps[min(by_eps, key=float)].get("clean", {})
            prefix = group[:-len(SEA_GROUP)]
            for score, value in first.items():
                if as_number(value) is not None:
                    metrics[metric_key(f"{prefix}clean_{score}")] = _score(f"{group} clean[{score!r}]", score, value)
    for name, value in (("train_hours", train_hours), ("attack_hours", attack_hours)):
        number = as_number(value)
        if number is None or number < 0:
            raise ValueError(f"{name} = {value!r}: must be a number >= 0 (hours)")
        metrics[name] = number
    return metrics
