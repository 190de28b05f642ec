"""The Top-k lambda staircase of the stage-1 loss (paper §2.2; docs/method.md#the-lambda-schedule).

Only the fraction of negatives the Top-k balanced loss keeps at each stage-1 iteration; the solver
schedules (learning rates, iterations, snapshots, and the period S used here) are
redseg.config.TrainingSchedule.
"""

from __future__ import annotations

import math


def topk_lambda(r: int, lambda0: float, period: int, max_iter: int) -> float:
    """lambda(r) = lambda0 * (1 - floor(r / S) / (M / S)), r = stage-1 iteration, 1-based.

    A staircase: lambda0 on [1, S-1], lambda0 * (1 - S/M) on [S, 2S-1], ... The paper's change to
    the original Top-k loss, which keeps lambda fixed.
    """
    if r < 1:
        raise ValueError(f"iteration r must be >= 1, got {r}")
    return lambda0 * (1.0 - math.floor(r / period) / (max_iter / period))


def kept_negatives(lam: float, n_neg: int) -> int:
    """Keep k = ceil(lambda * N-) hardest negatives: lambda is a fraction of the negatives.

    [assumption, docs/method.md#lambda-is-a-fraction]
    """
    # The small epsilon keeps float noise (e.g. 0.14 * 100 = 14.000000000000002) from adding one.
    return min(n_neg, max(0, math.ceil(lam * n_neg - 1e-9)))
