"""The sweep's summary: one row per trial, its columns ordered (settings, clean, SEA worst case, per loss, extra
attacks, defences, hours) and rendered as CSV and as the Markdown table with notes on what each number measures."""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from orchestrator.config import PROTOCOLS, Config
from orchestrator.scores import EXTRA_GROUP, SEA_GROUP, SEA_MIOU, SEA_MIOU_GREEDY

SUMMARY_COLUMNS = ("trial_name", "status", "attack_steps", "eps", "epochs", "backbone", "init", "seed", "protocol")


_FINAL = ("clean_", "sea_", f"{EXTRA_GROUP}_", "defense_")


def is_final(key: str) -> bool:
    return key.startswith((*_FINAL, *(f"final_{p}" for p in _FINAL))) or key in ("train_hours", "attack_hours")


_SEA_KEY = re.compile(
    r"sea_(?:(?P<name>.+)_)?(?P<score>miou|miou_greedy|miou_by_acc|aacc|macc)_eps(?P<eps>[0-9.e+-]+)")
_SCORES = {"miou": 0, "miou_greedy": 1, "miou_by_acc": 2, "aacc": 3, "macc": 4}
_OTHER_GROUP_KEY = re.compile(
    rf"(?:defense_(?P<defense>.+?)_)?(?P<group>{SEA_GROUP}|{EXTRA_GROUP}|clean)_(?:(?P<name>.+)_)?"
    r"(?P<score>miou|miou_greedy|miou_by_acc|aacc|macc)(?:_eps(?P<eps>[0-9.e+-]+))?")


def _eps_of(match: re.Match) -> float:
    try:
        return float(match.group("eps"))
    except ValueError:
        return math.inf


def metric_order(key: str) -> tuple:
    """Column order: clean scores, SEA worst case, SEA per loss, SEA's clean, extra attacks, defences (clean,
    SEA, extra attacks), hours; each by score then ε."""
    if key.startswith("clean_"):
        return (0, _SCORES.get(key[len("clean_"):], 9), 0.0, key)
    if key in ("train_hours", "attack_hours"):
        return (7, 0 if key == "train_hours" else 1, 0.0, key)
    match = _SEA_KEY.fullmatch(key)
    if match is None:
        other = _OTHER_GROUP_KEY.fullmatch(key)
        if other is None or (other.group("defense") is None and other.group("group") != EXTRA_GROUP):
            return (6, 0, 0.0, key)
        part = ("clean", SEA_GROUP, EXTRA_GROUP).index(other.group("group"))
        eps = _eps_of(other) if other.group("eps") else 0.0
        return (4 if other.group("defense") is None else 5, other.group("defense") or "", part,
                _SCORES[other.group("score")], eps, other.group("name") or "")
    name = match.group("name")
    rank = 1 if name is None else 3 if name == "clean" else 2
    return (rank, _SCORES[match.group("score")], _eps_of(match), name or "")


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    columns = list(SUMMARY_COLUMNS)
    extra = []
    for row in rows:
        for key in row:
            if key not in columns and key not in extra:
                extra.append(key)
    metrics = sorted((k for k in extra if is_final(k)), key=metric_order)
    others = [k for k in extra if not is_final(k) and k != "run_id"]
    return columns + metrics + others + ["run_id"]


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) else str(value)
    return str(value)


def summary_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """All columns of the summary as CSV (scores as fractions in [0, 1])."""
    columns = _columns(rows)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    return out.getvalue()


def _group_notes(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """What the extra attacks' and the defences' columns are, naming those that ran (only when some did)."""
    attacks, defenses = set(), set()
    for row in rows:
        for key in row:
            match = _OTHER_GROUP_KEY.fullmatch(key)
            if match is None:
                continue
            if match.group("defense") is not None:
                defenses.add(match.group("defense"))
            elif match.group("group") == EXTRA_GROUP and match.group("name"):
                attacks.add(match.group("name"))
    notes = []
    if attacks:
        notes.append(f"{EXTRA_GROUP}_{{attack}}_*: the extra attacks ({', '.join(sorted(attacks))}), run at every ε "
                     "on the SEA images and scored apart; they enter SEA's worst case (sea_*) only where the trial's "
                     "sea.extra_in_worst is true.")
    if defenses:
        notes.append(f"defense_{{d}}_* ({', '.join(sorted(defenses))}): the model behind the non-local-means filter, "
                     "scored clean, under SEA and under the extra attacks; nlm: attack points found on the bare model "
                     "(non-adaptive), nlm-bpda: attacks through the filter with BPDA (the honest number).")
    return notes


def sea_ensemble(config: Config) -> str:
    """The SEA ensemble a config runs, in words (for the summary)."""
    sea = config.sea
    track = "per-image cross-entropy" if sea.track == "ce" else "each loss itself"
    return (f"APGD with red-ε, {sea.iterations} iterations for each of {', '.join(sea.losses)}; "
            f"step sizes and restarts tracked by {track}")


def summary_markdown(rows: Sequence[Mapping[str, Any]], ensemble: str | None = None) -> str:
    """The headline columns as a Markdown table: settings, clean and worst-case SEA mIoU (the strongest and the
    paper's greedy number), the extra attacks' and defences' mIoU when they ran; a note says what the two SEA
    numbers, the protocols and those columns measure, and names the SEA ensemble when given (`sea_ensemble`).
    Times are left to summary.csv and MLflow, so the same seed gives the same table."""
    keep = [c for c in _columns(rows) if c in SUMMARY_COLUMNS or c in ("clean_miou", "clean_aacc")
            or re.fullmatch(rf"(?:final_)?(?:{SEA_MIOU}|{SEA_MIOU_GREEDY})[\d.]+", c)
            or re.fullmatch(rf"(?:{EXTRA_GROUP}_.+|defense_.+_{SEA_GROUP})_miou_eps[\d.]+|defense_.+_clean_miou", c)]
    lines = ["| " + " | ".join(keep) + " |", "|" + "---|" * len(keep)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(k)).replace("|", "\\|") for k in keep) + " |")
    note = [
        "",
        "Scores are fractions in [0, 1]; ε in units of 1/255; train and attack hours are in summary.csv.",
        f"{SEA_MIOU}{{E}}: SEA's strongest valid worst case (a refined per-image choice, at most the greedy one).",
        f"{SEA_MIOU_GREEDY}{{E}}: the paper's greedy worst case; this is the number comparable with the paper's "
        "tables (protocol reference).",
        "Scores without a prefix are for the checkpoint selected on the held-out selection images (never the val "
        "images scored here); final_* for the last epoch's checkpoint.",
        *(f"protocol {name}: {text}." for name, text in PROTOCOLS.items()),
        *_group_notes(rows),
        *([f"SEA ensemble: {ensemble}."] if ensemble else []),
    ]
    return "\n".join(lines) + "\n" + "\n".join(note) + "\n"
