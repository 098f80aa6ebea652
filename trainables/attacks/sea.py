"""SEA, the Segmentation Ensemble Attack: APGD with red-ε on several losses, and its per-image worst case.

`sea` scores one batch and returns per-image counts (a picklable `SeaResult` of CPU tensors); `aggregate`
combines any number of such results (batches, actors, machines) into clean, per-attack and worst-case
aAcc / mAcc / mIoU. Results that carry image ids are ordered by id, so the greedy worst case does not depend
on which actor returned first.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data.classes import IGNORE_INDEX
from trainables.attacks.apgd import apgd
from trainables.attacks.common import check_batch, check_count, check_eps, check_loss, check_track, eval_mode
from trainables.defense import DEFENSES, defended_models
from trainables.losses import check_labels
from trainables.metrics import intersection_union, label_area, scores_from_counts, stuff_pq_from_counts

log = logging.getLogger(__name__)

# the reference code's four losses (Mask-CE, SegPGD's Bal-CE, JS, Mask-Sph) and Mask-CE-Bal of the paper's text;
# the paper's three come first so that they keep their seeds (loss j starts from seed + j)
SEA_LOSSES = ("mce-bal", "mce", "js", "segpgd", "mask-sph")
CLEAN = "clean"
WORST = "worst"


@dataclass
class SeaResult:
    """Per-image counts of one SEA batch, for the clean images and each attack's output (CPU tensors).

    inter / union: name -> N×K int64; correct: name -> N int64, where name is "clean" or a loss name;
    area: labelled pixels per class N×K; labelled: labelled pixels per image N; track: what drove APGD's
    step sizes and restarts ("ce" or "own").
    """

    eps: float
    losses: tuple[str, ...]
    num_classes: int
    area: Tensor
    labelled: Tensor
    inter: dict[str, Tensor]
    union: dict[str, Tensor]
    correct: dict[str, Tensor]
    ids: Tensor | None = None
    defense: str | None = None
    track: str = "ce"
    seconds: dict[str, float] = field(default_factory=dict)
    adv: dict[str, Tensor] | None = None

    def __len__(self) -> int:
        return int(self.labelled.shape[0])


def _check_losses(losses: Sequence[str], where: str) -> tuple[str, ...]:
    if isinstance(losses, str) or not isinstance(losses, Sequence) or len(losses) == 0:
        raise ValueError(f"{where}: losses must be a non-empty list of loss names, got {losses!r}")
    names = tuple(check_loss(name, where) for name in losses)
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: losses {list(names)} lists a loss twice")
    return names


def _check_ids(ids: Tensor | Sequence[int] | None, n: int, where: str) -> Tensor | None:
    if ids is None:
        return None
    ids = torch.as_tensor(ids).detach().cpu()
    if ids.dim() != 1 or ids.shape[0] != n or ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError(f"{where}: ids must be {n} integers (one per image), got {ids.dtype} {tuple(ids.shape)}")
    return ids.long()


@dataclass
class ScoreAt:
    """Labels at each image's original size, for scoring predictions there (the `full` evaluation protocol).

    labels: N×H×W, image m's label top-left in its sizes[m] = (h, w) and the ignore value elsewhere;
    content: N×2, the (height, width) image m takes inside the padded model input. A prediction is the
    logits of that region upsampled bilinearly (align_corners=False) to (h, w), then the argmax, as the
    segmentation toolkits score; padding is cut off first, so it never reaches a score.
    """

    labels: Tensor
    sizes: Tensor
    content: Tensor

    def checked(self, x: Tensor, num_classes: int, ignore_index: int, where: str) -> ScoreAt:
        """This on x's device, after checking shapes and label values against the batch x (N×C×H×W)."""
        n, _, height, width = x.shape
        labels, sizes, content = (torch.as_tensor(t).to(x.device) for t in (self.labels, self.sizes, self.content))
        if labels.dim() != 3 or labels.shape[0] != n or labels.is_floating_point():
            raise ValueError(f"{where}: score_at.labels must be {n}×H×W integers, got {tuple(labels.shape)}")
        for name, value, bound in (("sizes", sizes, tuple(labels.shape[1:])), ("content", content, (height, width))):
            if value.shape != (n, 2) or not all(1 <= h <= bound[0] and 1 <= w <= bound[1] for h, w in value.tolist()):
                raise ValueError(f"{where}: score_at.{name} = {value.tolist()}; must be {n} (height, width) pairs "
                                 f"within 1..{bound}")
        check_labels(labels, num_classes, ignore_index, where=where)
        outside = labels != ignore_index
        for m, (h, w) in enumerate(sizes.tolist()):
            outside[m, :h, :w] = False
        if bool(outside.any()):
            raise ValueError(f"{where}: score_at.labels hold labels outside their sizes; pad with {ignore_index}")
        return ScoreAt(labels.long(), sizes.long(), content.long())

    def predict(self, logits: Tensor) -> Tensor:
        """Class per pixel of the labels (N×H×W) from logits on the model input (N×K×h×w)."""
        pred = torch.zeros(self.labels.shape, dtype=torch.long, device=logits.device)
        for m, ((h, w), (ch, cw)) in enumerate(zip(self.sizes.tolist(), self.content.tolist(), strict=True)):
            region = logits[m:m + 1, :, :ch, :cw]
            pred[m, :h, :w] = F.interpolate(region, size=(h, w), mode="bilinear", align_corners=False).argmax(1)[0]
        return pred


@torch.no_grad()
def predict_classes(model: nn.Module, x: Tensor, num_classes: int, score_at: ScoreAt | None = None) -> Tensor:
    """Class maps of a batch (at the original label sizes with score_at); checks the logits' shape."""
    logits = model(x)
    if logits.dim() != 4 or logits.shape[1] != num_classes:
        raise ValueError(f"sea: model gives logits {tuple(logits.shape)}, expected N×{num_classes}×H×W")
    return logits.argmax(1) if score_at is None else score_at.predict(logits)


def sea(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    num_classes: int,
    n_iter: int = 300,
    losses: Sequence[str] = SEA_LOSSES,
    ignore_index: int = IGNORE_INDEX,
    ids: Tensor | Sequence[int] | None = None,
    seed: int | None = None,
    return_adv: bool = False,
    defense: str | None = None,
    score_at: ScoreAt | None = None,
    track: str = "ce",
) -> SeaResult:
    """Run APGD with red-ε for each loss on one batch and count, per image, clean and attacked predictions.

    eps is in [0, 1] pixel units. Loss j draws its random start from seed + j (or torch's global generator
    when seed is None). defense: None (the bare model), "nlm" (attacks see the bare model, predictions go
    through the non-local-means front end: the non-adaptive evaluation) or "nlm-bpda" (attacks go through the
    front end with an identity gradient). return_adv keeps each attack's adversarial images (CPU) in `adv`.
    score_at (the `full` protocol) counts every prediction at the images' original label sizes instead of
    against y; the attacks still take their loss against y at the model input's size.
    track: what drives APGD's step sizes and restarts, "ce" (per-image cross-entropy, as the reference code) or
    "own" (each attack loss itself).
    """
    where = "sea"
    eps = check_eps(eps, where)
    n_iter = check_count(n_iter, where, "n_iter", 1)
    names = _check_losses(losses, where)
    check_track(track, where)
    num_classes = check_count(num_classes, where, "num_classes", 1)
    if defense not in DEFENSES:
        raise ValueError(f"{where}: defense = {defense!r}; valid: {', '.join(repr(d) for d in DEFENSES)}")
    check_batch(x, y, where, ignore_index, num_classes)
    ids = _check_ids(ids, x.shape[0], where)
    x = x.detach()
    if score_at is not None:
        score_at = score_at.checked(x, num_classes, ignore_index, where)
    counts = _Counts(y if score_at is None else score_at.labels, num_classes, ignore_index)
    adv: dict[str, Tensor] = {}
    with eval_mode(model):
        attacked, scored = defended_models(model, defense)
        with counts.timed(CLEAN):
            counts.add(CLEAN, predict_classes(scored, x, num_classes, score_at))
        for j, name in enumerate(names):
            with counts.timed(name):
                x_adv = apgd(attacked, x, y, eps=eps, n_iter=n_iter, loss=name, red_eps=True, random_start=True,
                             ignore_index=ignore_index, seed=None if seed is None else seed + j, track=track)
                counts.add(name, predict_classes(scored, x_adv, num_classes, score_at))
            if return_adv:
                adv[name] = x_adv.cpu()
            log.info("sea eps=%.4g %s: aAcc %.2f%% on %d images in %.1f s", eps, name, 100 * counts.accuracy(name),
                     x.shape[0], counts.seconds[name])
    return SeaResult(
        eps=eps, losses=names, num_classes=num_classes, area=counts.area(), labelled=counts.labelled,
        inter=counts.inter, union=counts.union, correct=counts.correct, ids=ids, defense=defense, track=track,
        seconds=counts.seconds, adv=adv if return_adv else None,
    )


class _Counts:
    """Per prediction (clean, each loss): per-image class intersections, unions and correct pixels, and seconds."""

    def __init__(self, labels: Tensor, num_classes: int, ignore_index: int):
        self.labels, self.num_classes, self.ignore_index = labels, num_classes, ignore_index
        self.labelled = (labels != ignore_index).sum((1, 2)).cpu()
        self.inter: dict[str, Tensor] = {}
        self.union: dict[str, Tensor] = {}
        self.correct: dict[str, Tensor] = {}
        self.seconds: dict[str, float] = {}

    def add(self, name: str, pred: Tensor) -> None:
        i, u, c, _ = intersection_union(pred, self.labels, self.num_classes, self.ignore_index)
        self.inter[name], self.union[name], self.correct[name] = i.cpu(), u.cpu(), c.cpu()

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - started

    def accuracy(self, name: str) -> float:
        return float(self.correct[name].sum()) / max(int(self.labelled.sum()), 1)

    def area(self) -> Tensor:
        return label_area(self.labels, self.num_classes, self.ignore_index).cpu()


def _miou_rows(inter: np.ndarray, union: np.ndarray) -> np.ndarray:
    """mIoU of each row of totals (C×K): mean over classes with union > 0 (+inf for a row without any)."""
    present = union > 0
    ratio = np.divide(inter, union, out=np.zeros_like(inter), where=present)
    counts = present.sum(-1)
    return np.where(counts > 0, ratio.sum(-1) / np.maximum(counts, 1), np.inf)


def _miou_of(choice: np.ndarray, inter: np.ndarray, union: np.ndarray) -> float:
    images = np.arange(inter.shape[1])
    value = float(_miou_rows(inter[choice, images].sum(0), union[choice, images].sum(0)))
    return value if np.isfinite(value) else float("nan")


def greedy_choice(inter: np.ndarray, union: np.ndarray) -> np.ndarray:
    """Walk the images in order; for each add the candidate (C×M×K counts) that makes the running mIoU lowest."""
    candidates, images, classes = inter.shape
    run_inter, run_union = np.zeros(classes), np.zeros(classes)
    choice = np.zeros(images, dtype=np.int64)
    for m in range(images):
        c = int(np.argmin(_miou_rows(run_inter + inter[:, m], run_union + union[:, m])))
        choice[m] = c
        run_inter += inter[c, m]
        run_union += union[c, m]
    return choice


def refine_choice(choice: np.ndarray, inter: np.ndarray, union: np.ndarray, max_passes: int = 20) -> np.ndarray:
    """Revisit each image's choice given all the others, switching while it lowers the total mIoU."""
    choice = choice.copy()
    images = np.arange(inter.shape[1])
    tot_inter, tot_union = inter[choice, images].sum(0), union[choice, images].sum(0)
    for _ in range(max_passes):
        switched = False
        for m in images:
            c = choice[m]
            rest_inter, rest_union = tot_inter - inter[c, m], tot_union - union[c, m]
            values = _miou_rows(rest_inter + inter[:, m], rest_union + union[:, m])
            best = int(np.argmin(values))
            if values[best] < values[c] - 1e-12:
                choice[m] = best
                tot_inter, tot_union = rest_inter + inter[best, m], rest_union + union[best, m]
                switched = True
        if not switched:
            break
    return choice


def _concat(results: Sequence[SeaResult], num_classes: int) -> SeaResult:
    first = results[0]
    for r in results:
        if not isinstance(r, SeaResult):
            raise TypeError(f"aggregate: expected SeaResult objects, got {type(r).__name__}")
        if r.num_classes != num_classes:
            raise ValueError(f"aggregate: a result has {r.num_classes} classes, aggregate was asked for {num_classes}")
        if (r.losses, r.eps, r.defense, r.track) != (first.losses, first.eps, first.defense, first.track):
            raise ValueError(
                "aggregate: results differ in losses, eps, defense or track "
                f"({r.losses}, {r.eps:g}, {r.defense}, {r.track}) vs "
                f"({first.losses}, {first.eps:g}, {first.defense}, {first.track}); aggregate each setting separately"
            )
    with_ids = [r.ids is not None for r in results]
    if any(with_ids) and not all(with_ids):
        raise ValueError("aggregate: some results carry image ids and some do not; pass ids to every sea call or none")
    order = None
    ids = None
    if all(with_ids):
        ids = torch.cat([r.ids for r in results])
        if torch.unique(ids).numel() != ids.numel():
            raise ValueError("aggregate: duplicate image ids; each image must be scored once per setting")
        order = torch.argsort(ids, stable=True)

    def cat(tensors: list[Tensor]) -> Tensor:
        joined = torch.cat(tensors)
        return joined if order is None else joined[order]

    names = (CLEAN, *first.losses)
    return SeaResult(
        eps=first.eps, losses=first.losses, num_classes=num_classes,
        area=cat([r.area for r in results]), labelled=cat([r.labelled for r in results]),
        inter={n: cat([r.inter[n] for r in results]) for n in names},
        union={n: cat([r.union[n] for r in results]) for n in names},
        correct={n: cat([r.correct[n] for r in results]) for n in names},
        ids=None if ids is None else ids[order], defense=first.defense, track=first.track,
    )


def aggregate(results: Iterable[SeaResult], num_classes: int) -> dict[str, dict[str, float]]:
    """Scores of many SEA results: keys "clean", each loss and "worst", each {"miou", "aacc", "macc", ...}.

    Clean and single attacks also give stuff "pq", "sq", "rq". The worst case per image chooses among all
    attacks and the clean prediction (a point in the ball too): aAcc and mAcc from the lowest-accuracy choice.
    Its three mIoUs, each a valid per-image choice of points in the ε-ball:
    "miou_greedy", the paper's quantity (the one comparable with its tables): walk the images in id order
    keeping the running mIoU lowest (ALGORITHMS.md); "miou_by_acc": the lowest-accuracy choice; "miou", the
    strongest: start from the lowest of these and of each single attack and revisit every image's choice
    while that lowers the mIoU, so it is ≤ all of them (never above the paper's number).
    """
    results = list(results)
    if not results:
        raise ValueError("aggregate: no results to combine")
    r = _concat(results, num_classes)
    out: dict[str, dict[str, float]] = {}
    names = (CLEAN, *r.losses)
    for name in names:
        out[name] = {
            **scores_from_counts(r.inter[name], r.union[name], r.area),
            **stuff_pq_from_counts(r.inter[name], r.union[name], r.area),
        }

    candidates = (*r.losses, CLEAN)
    inter = np.stack([r.inter[n].double().numpy() for n in candidates])
    union = np.stack([r.union[n].double().numpy() for n in candidates])
    correct = np.stack([r.correct[n].numpy() for n in candidates])
    images = np.arange(len(r))
    by_acc = np.argmin(correct, axis=0)
    acc_scores = scores_from_counts(torch.from_numpy(inter[by_acc, images]), torch.from_numpy(union[by_acc, images]),
                                    r.area)
    greedy = greedy_choice(inter, union)
    starts = [greedy, by_acc, *(np.full(len(r), c) for c in range(len(candidates)))]
    start = min(starts, key=lambda choice: _miou_of(choice, inter, union))
    refined = refine_choice(start, inter, union)
    labelled = int(r.labelled.sum())
    out[WORST] = {
        "miou": _miou_of(refined, inter, union),
        "aacc": float(correct.min(0).sum()) / labelled if labelled else float("nan"),
        "macc": acc_scores["macc"],
        "miou_greedy": _miou_of(greedy, inter, union),
        "miou_by_acc": acc_scores["miou"],
    }
    return out
