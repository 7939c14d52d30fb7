import torch


def rel(a, b) -> float:
    """Relative Frobenius error of a against b (float64); the denominator is floored at
    1e-3 * sqrt(numel) so that an all-zero reference (e.g. dq with a single key) is compared
    in absolute terms instead of dividing by zero."""
    a, b = a.detach().double(), b.detach().double()
    floor = 1e-3 * max(b.numel(), 1) ** 0.5
    return float((a - b).norm() / max(float(b.norm()), floor))
