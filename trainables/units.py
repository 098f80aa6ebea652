"""Perturbation units: configs speak in 1/255, attacks in [0, 1]; the conversion lives here only."""

EPS_SCALE = 255.0


def to_unit(value_255: float) -> float:
    """Convert a budget given in units of 1/255 (config, CLI, metric names) to [0, 1] pixel units."""
    return float(value_255) / EPS_SCALE


def eps_label(value_255: float) -> str:
    """Write an ε in 1/255 units for metric names: 4.0 -> '4', 0.5 -> '0.5'."""
    return f"{float(value_255):g}"
