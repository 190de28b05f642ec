"""Straightforward float64 reference implementations of the two losses: the numerical oracle.

Written as directly from the formulas of paper section 2.2 as possible (full sort, explicit
log p), independent of python_layers/losses.py, so that the fast Caffe layers can be checked
against them: by the tests (tests/model/test_losses.py, tests/model/test_loss_speed_equivalence.py) and by
the benchmark (redseg.experiments.benchmark), which times both on the same inputs. Slow on purpose; never
used for training.
"""

from __future__ import annotations

import math

import numpy as np


def reference_lambda(r: int, lambda0: float, period: int, max_iter: int) -> float:
    return lambda0 * (1 - (r // period) / (max_iter / period))


def reference_topk(x: np.ndarray, y: np.ndarray, lam: float, fov: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """Loss and gradient w.r.t. x of the Top-k balanced CE, summed over the images of a batch.

    ``fov`` (optional, same shape, non-zero inside): negatives counted only inside it."""
    x = x.astype(np.float64)
    loss, grad = 0.0, np.zeros_like(x)
    for i in range(x.shape[0]):
        xi, yi, gi = x[i].ravel(), y[i].ravel() > 0.5, grad[i].reshape(-1)
        p = np.exp(-np.logaddexp(0, -xi))  # sigmoid without overflow
        inside = np.ones_like(yi) if fov is None else fov[i].ravel() > 0.5
        neg = np.flatnonzero(~yi & inside)
        k = min(len(neg), math.ceil(round(lam * len(neg), 9)))
        neg_loss = np.logaddexp(0, xi[neg])  # -log(1 - p)
        top = neg[np.argsort(-neg_loss, kind="stable")[:k]]
        n_pos = int(yi.sum())
        beta = k / (k + n_pos) if k + n_pos else 0.0
        loss += beta * np.logaddexp(0, -xi[yi]).sum() + (1 - beta) * neg_loss[np.isin(neg, top)].sum()
        gi[yi] = beta * (p[yi] - 1)
        gi[top] = (1 - beta) * p[top]
    return float(loss), grad


def reference_fnfp(x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    x = x.astype(np.float64)
    p = np.exp(-np.logaddexp(0, -x))
    fn = np.sum(y * (1 - p) ** 2)
    fp = np.sum((1 - y) * p**2)
    return float(fn + fp), 2 * (p - y) * p * (1 - p)
