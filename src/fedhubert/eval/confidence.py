"""Binomial confidence intervals for accuracies measured on a finite number of clips.

The Wilson score interval, not the normal approximation p +- z*sqrt(p(1-p)/n): that one collapses to a width of
zero at 0% or 100% and leaves [0, 1] near them, which is where small test sets put accuracies.
"""

from __future__ import annotations

import math


def wilson_interval(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion `correct / total`; z = 1.96 gives 95%."""
    if total <= 0 or not 0 <= correct <= total:
        raise ValueError(f"need 0 <= correct <= total and total > 0, got {correct} of {total}")
    p = correct / total
    z2 = z * z / total
    centre = (p + z2 / 2) / (1 + z2)
    half = z * math.sqrt(p * (1 - p) / total + z2 / (4 * total)) / (1 + z2)
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_interval(accuracy: float, total: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson interval of an accuracy measured on `total` items, its count of correct items rounded back."""
    return wilson_interval(round(accuracy * total), total, z)
