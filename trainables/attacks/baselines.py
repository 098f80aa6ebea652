"""The panoptic seed's baseline attacks (FGSM, iterative FGSM, iterative least-likely) scored per image like SEA.

`baselines` runs them on one batch and returns a `SeaResult` whose "losses" are the attack names, so
`aggregate` scores them and, merged into a SEA result with `merge_results`, lets them join its worst case.
`score_points` scores given attack points through any model (a defended one, for the non-adaptive evaluation).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from data.classes import IGNORE_INDEX
from trainables.attacks.common import check_batch, check_count, check_eps, check_valid, eval_mode
from trainables.attacks.pgd import fgsm, ifgsm, least_likely
from trainables.attacks.sea import CLEAN, ScoreAt, SeaResult, predict_classes
from trainables.defense import DEFENSES, defended_models
from trainables.metrics import intersection_union, label_area

# name (as `sea.extra_attacks` spells it) -> attack(model, x, y, *, eps, ignore_index), eps in pixel units
BASELINES = {"fgsm": fgsm, "ifgsm": ifgsm, "least-likely": least_likely}


def check_attacks(attacks: Sequence[str], where: str) -> tuple[str, ...]:
    """A non-empty list of distinct names from BASELINES, else an error listing the valid ones."""
    if isinstance(attacks, str) or not isinstance(attacks, Sequence) or len(attacks) == 0:
        raise ValueError(f"{where}: attacks must be a non-empty list of names, got {attacks!r}")
    for name in attacks:
        if name not in BASELINES:
            raise ValueError(f"{where}: attack {name!r} is unknown; valid: {', '.join(BASELINES)}")
    if len(set(attacks)) != len(attacks):
        raise ValueError(f"{where}: attacks {list(attacks)} lists an attack twice")
    return tuple(attacks)


def score_points(
    scored: nn.Module,
    x: Tensor,
    y: Tensor,
    points: Mapping[str, Tensor],
    *,
    eps: float,
    num_classes: int,
    ignore_index: int = IGNORE_INDEX,
    ids: Tensor | None = None,
    score_at: ScoreAt | None = None,
    defense: str | None = None,
    seconds: Mapping[str, float] | None = None,
    return_adv: bool = False,
) -> SeaResult:
    """Per-image counts of `scored`'s predictions on x (clean) and on each attack point (name -> N×C×H×W).

    Every point is checked to lie in the ε-ball around x and in [0, 1] (eps in pixel units) first.
    """
    where = "score_points"
    eps = check_eps(eps, where)
    num_classes = check_count(num_classes, where, "num_classes", 1)
    check_batch(x, y, where, ignore_index, num_classes)
    if not points:
        raise ValueError(f"{where}: no attack points to score")
    if score_at is not None:
        score_at = score_at.checked(x, num_classes, ignore_index, where)
    scored_y = y if score_at is None else score_at.labels
    inter, union, correct = {}, {}, {}
    with eval_mode(scored):
        for name, point in ((CLEAN, x), *points.items()):
            if name != CLEAN:
                check_valid(point.to(x.device), x, eps, f"{where} {name}")
            predicted = predict_classes(scored, point.to(x.device), num_classes, score_at)
            i, u, c, _ = intersection_union(predicted, scored_y, num_classes, ignore_index)
            inter[name], union[name], correct[name] = i.cpu(), u.cpu(), c.cpu()
    return SeaResult(
        eps=eps, losses=tuple(points), num_classes=num_classes,
        area=label_area(scored_y, num_classes, ignore_index).cpu(),
        labelled=(scored_y != ignore_index).sum((1, 2)).cpu(), inter=inter, union=union, correct=correct,
        ids=None if ids is None else torch.as_tensor(ids).detach().cpu().long(), defense=defense,
        seconds=dict(seconds or {}), adv={k: v.detach().cpu() for k, v in points.items()} if return_adv else None,
    )


def baselines(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    num_classes: int,
    attacks: Sequence[str] = tuple(BASELINES),
    ignore_index: int = IGNORE_INDEX,
    ids: Tensor | Sequence[int] | None = None,
    defense: str | None = None,
    score_at: ScoreAt | None = None,
    return_adv: bool = False,
) -> SeaResult:
    """Run each baseline attack at ε (pixel units) on one batch and count clean and attacked predictions per image.

    defense as in `sea`: None, "nlm" (attack the bare model, score the defended one) or "nlm-bpda" (attack and
    score the defended model, gradients through the filter as the identity). The attacks take their loss against
    y; with score_at the predictions are counted at the original label sizes.
    """
    where = "baselines"
    names = check_attacks(attacks, where)
    eps = check_eps(eps, where)
    if defense not in DEFENSES:
        raise ValueError(f"{where}: defense = {defense!r}; valid: {', '.join(repr(d) for d in DEFENSES)}")
    check_batch(x, y, where, ignore_index, num_classes)
    x = x.detach()
    attacked, scored = defended_models(model, defense)
    points, seconds = {}, {}
    for name in names:
        started = time.perf_counter()
        points[name] = BASELINES[name](attacked, x, y, eps=eps, ignore_index=ignore_index)
        seconds[name] = time.perf_counter() - started
    return score_points(scored, x, y, points, eps=eps, num_classes=num_classes, ignore_index=ignore_index,
                        ids=None if ids is None else torch.as_tensor(ids), score_at=score_at, defense=defense,
                        seconds=seconds, return_adv=return_adv)


def merge_results(first: SeaResult, second: SeaResult) -> SeaResult:
    """One result holding both results' attacks (first's, then second's), so `aggregate`'s worst case covers all.

    Both must count the same images with the same scored model: same ε, classes, defence, ids, labels and clean
    counts; attack names must not repeat.
    """
    where = "merge_results"
    if (first.eps, first.num_classes, first.defense) != (second.eps, second.num_classes, second.defense):
        raise ValueError(f"{where}: results differ in eps, classes or defense: ({first.eps:g}, {first.num_classes}, "
                         f"{first.defense}) vs ({second.eps:g}, {second.num_classes}, {second.defense})")
    same_ids = (first.ids is None and second.ids is None) or (
        first.ids is not None and second.ids is not None and torch.equal(first.ids, second.ids))
    same_images = same_ids and torch.equal(first.area, second.area) and torch.equal(first.labelled, second.labelled)
    same_clean = same_images and all(torch.equal(getattr(first, k)[CLEAN], getattr(second, k)[CLEAN])
                                     for k in ("inter", "union", "correct"))
    if not same_clean:
        raise ValueError(f"{where}: the results score different images, labels or clean predictions")
    overlap = set(first.losses) & set(second.losses)
    if overlap:
        raise ValueError(f"{where}: both results hold {sorted(overlap)}")
    adv = None
    if first.adv is not None and second.adv is not None:
        adv = {**first.adv, **second.adv}
    return SeaResult(
        eps=first.eps, losses=first.losses + second.losses, num_classes=first.num_classes, area=first.area,
        labelled=first.labelled, inter={**second.inter, **first.inter}, union={**second.union, **first.union},
        correct={**second.correct, **first.correct}, ids=first.ids, defense=first.defense, track=first.track,
        seconds={**second.seconds, **first.seconds}, adv=adv,
    )
