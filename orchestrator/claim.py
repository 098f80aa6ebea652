"""The sweep's claim: SEA mIoU against training epochs, one line per init, as mean and spread over seeds.

Rows are the summary rows of `SweepTracker.summary_rows` (params are MLflow strings, scores fractions in [0, 1],
ε in 1/255 units); trials that differ only in `seed` form one group, a row without a seed counts as one seed.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.figure import Figure

from orchestrator.plots import new_figure
from orchestrator.scores import as_number
from orchestrator.summary import metric_order
from trainables.units import eps_label

SEED = "seed"
CLAIM_AXES = ("init", "epochs")
STATS = ("mean", "std", "min", "max")


def group_params() -> list[str]:
    """The short params that define a group: every one of `SHORT_PARAMS` but the seed."""
    from orchestrator.tracking import SHORT_PARAMS

    return [key for key in SHORT_PARAMS if key != SEED]


def _epochs(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.inf


def _stats(values: list[float]) -> dict[str, float | None]:
    """Mean, sample standard deviation (None for one value), min and max of the values (all None for none)."""
    if not values:
        return dict.fromkeys(STATS)
    std = statistics.stdev(values) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "std": std, "min": min(values), "max": max(values)}


def score_keys(eps: Sequence[float]) -> list[str]:
    """The aggregated scores: clean mIoU, then SEA's worst-case mIoU at each ε."""
    return ["clean_miou"] + [f"sea_miou_eps{eps_label(e)}" for e in sorted(float(e) for e in eps)]


def claim_table(rows: Sequence[Mapping[str, Any]], eps: Sequence[float]) -> list[dict[str, Any]]:
    """One entry per group of finished trials that differ only in seed: `params` (the group's short params),
    `seeds` (n) and, per score of `score_keys(eps)`, {mean, std (ddof=1, None when n = 1), min, max}; sorted by
    init, then epochs as a number, then the other params."""
    keys = group_params()
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for row in rows:
        if row.get("status") == "FINISHED" and as_number(row.get("clean_miou")) is not None:
            groups.setdefault(tuple(row.get(k) for k in keys), []).append(row)
    table = []
    for values, members in groups.items():
        entry: dict[str, Any] = {"params": dict(zip(keys, values, strict=True)), "seeds": len(members)}
        for score in score_keys(eps):
            entry[score] = _stats([v for m in members if (v := as_number(m.get(score))) is not None])
        table.append(entry)

    def order(entry: dict[str, Any]) -> tuple:
        params = entry["params"]
        rest = tuple(str(params[k]) for k in keys if k not in CLAIM_AXES)
        return (str(params.get("init")), _epochs(params.get("epochs")), rest)

    return sorted(table, key=order)


def shows_claim(table: Sequence[Mapping[str, Any]]) -> bool:
    """Whether the claim is worth writing: the groups differ in init or epochs, or some group has several seeds."""
    varied = any(len({entry["params"].get(k) for entry in table}) > 1 for k in CLAIM_AXES)
    return varied or any(entry["seeds"] > 1 for entry in table)


def _scores(table: Sequence[Mapping[str, Any]]) -> list[str]:
    found = {k for entry in table for k, v in entry.items() if isinstance(v, Mapping) and "mean" in v}
    return sorted(found, key=metric_order)


def _varying(table: Sequence[Mapping[str, Any]]) -> list[str]:
    """The params besides init and epochs whose values differ between groups."""
    keys = [k for k in (table[0]["params"] if table else {}) if k not in CLAIM_AXES]
    return [k for k in keys if len({entry["params"].get(k) for entry in table}) > 1]


def _mean_std(stats: Mapping[str, float | None]) -> str:
    if stats.get("mean") is None:
        return ""
    if stats.get("std") is None:
        return f"{stats['mean']:.4f}"
    return f"{stats['mean']:.4f} ± {stats['std']:.4f}"


def _score_title(key: str) -> str:
    if key == "clean_miou":
        return "clean mIoU"
    return f"SEA mIoU ε={key.rsplit('_eps', 1)[1]}/255"


def claim_markdown(table: Sequence[Mapping[str, Any]], eps: Sequence[float]) -> str:
    """The claim as a Markdown table: per group its init, epochs and other varying params, n seeds, and
    mean ± sample std over seeds of clean mIoU and SEA mIoU at each ε; constant params in a note below."""
    params = [*CLAIM_AXES, *_varying(table)]
    scores = [k for k in score_keys(eps) if any(entry.get(k, {}).get("mean") is not None for entry in table)]
    header = [*params, "seeds", *(_score_title(k) for k in scores)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for entry in table:
        cells = [str(entry["params"].get(k, "")) for k in params] + [str(entry["seeds"])]
        cells += [_mean_std(entry.get(k, {})) for k in scores]
        lines.append("| " + " | ".join(cells) + " |")
    fixed = [k for k in (table[0]["params"] if table else {}) if k not in params]
    notes = ["Mean ± sample standard deviation (ddof = 1) over the seeds of each group (no ± for one seed); mIoU "
             "as a fraction in [0, 1]; SEA: the worst case over its attacks at ε in units of 1/255."]
    if fixed:
        notes.append("Same in every group: " + ", ".join(f"{k}={table[0]['params'][k]}" for k in fixed) + ".")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def claim_csv(table: Sequence[Mapping[str, Any]]) -> str:
    """The claim as CSV: the group's params (init and epochs first), seeds, and {score}_{mean,std,min,max}
    at full precision."""
    params = [*CLAIM_AXES, *(k for k in (table[0]["params"] if table else {}) if k not in CLAIM_AXES)]
    scores = _scores(table)
    columns = [*params, "seeds", *(f"{k}_{s}" for k in scores for s in STATS)]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for entry in table:
        stats = [entry[k][s] for k in scores for s in STATS]
        row = [entry["params"].get(k) for k in params] + [entry["seeds"]] + stats
        writer.writerow(["" if v is None else v for v in row])
    return out.getvalue()


def claim_plot(table: Sequence[Mapping[str, Any]], eps: Sequence[float]) -> Figure:
    """One panel per ε: SEA mIoU against training epochs (log2 axis), one line per init (and other varying
    params) at the mean over seeds, shaded from the min to the max seed."""
    eps = sorted(float(e) for e in eps)
    varying = _varying(table)
    figure = new_figure(4.5 * max(1, len(eps)), 4.0)
    lines: dict[str, list[Mapping[str, Any]]] = {}
    for entry in table:
        params = entry["params"]
        label = ", ".join([f"init={params.get('init')}", *(f"{k}={params.get(k)}" for k in varying)])
        lines.setdefault(label, []).append(entry)
    epochs = sorted({x for entry in table if math.isfinite(x := _epochs(entry["params"].get("epochs")))})
    for i, e in enumerate(eps):
        axes = figure.add_subplot(1, len(eps), i + 1)
        key = f"sea_miou_eps{eps_label(e)}"
        for label, entries in lines.items():
            points = sorted((_epochs(entry["params"].get("epochs")), entry[key]) for entry in entries
                            if key in entry and entry[key]["mean"] is not None
                            and math.isfinite(_epochs(entry["params"].get("epochs"))))
            if not points:
                continue
            xs = [x for x, _ in points]
            (line,) = axes.plot(xs, [s["mean"] for _, s in points], marker="o", label=label)
            axes.fill_between(xs, [s["min"] for _, s in points], [s["max"] for _, s in points],
                              color=line.get_color(), alpha=0.2, linewidth=0)
        if epochs and epochs[0] > 0:
            axes.set_xscale("log", base=2)
        if epochs:
            axes.set_xticks(epochs, [f"{x:g}" for x in epochs])
            axes.minorticks_off()
        axes.set_xlabel("training epochs (log2 scale)")
        axes.set_ylabel("SEA mIoU (fraction)")
        axes.set_title(f"SEA mIoU at ε = {eps_label(e)}/255")
        axes.grid(alpha=0.3)
        if axes.lines:
            axes.legend(fontsize="small", title="mean, min–max over seeds", title_fontsize="small")
    return figure


def log_claim(client, run_id: str, rows: Sequence[Mapping[str, Any]], eps: Sequence[float]) -> bool:
    """Log `claim.md`, `claim.csv` and `sea_miou_vs_epochs.png` on a run when `shows_claim`; returns whether."""
    table = claim_table(rows, eps)
    if not eps or not shows_claim(table):
        return False
    client.log_text(run_id, claim_markdown(table, eps), "claim.md")
    client.log_text(run_id, claim_csv(table), "claim.csv")
    client.log_figure(run_id, claim_plot(table, eps), "sea_miou_vs_epochs.png")
    return True
