"""Adversarial attacks on segmentation models: PGD family, APGD with red-ε, and the SEA ensemble."""

from trainables.attacks.apgd import apgd
from trainables.attacks.common import AttackValidityError, check_valid, raise_on_values, value_checks
from trainables.attacks.pgd import fgsm, ifgsm, least_likely, pgd
from trainables.attacks.sea import SEA_LOSSES, ScoreAt, SeaResult, aggregate, sea

__all__ = [
    "SEA_LOSSES",
    "AttackValidityError",
    "ScoreAt",
    "SeaResult",
    "aggregate",
    "apgd",
    "check_valid",
    "fgsm",
    "ifgsm",
    "least_likely",
    "pgd",
    "raise_on_values",
    "sea",
    "value_checks",
]
