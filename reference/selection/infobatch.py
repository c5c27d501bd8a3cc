"""InfoBatch's soft pruning with expectation rescaling (Qin et al. 2024).

Each sample i carries a score H_i, its loss when last seen.  Samples scoring below the mean,
``H_i < mean(H)`` ("well learned"), are pruned at random with probability r (the prune ratio);
the well-learned samples that are kept have their loss (so their gradient) scaled by
``1 / (1 - r)``; every other sample is kept with weight 1.  The expected weight of every sample is
then 1: ``(1 - r) / (1 - r)`` for a well-learned one, so the expected gradient over an epoch is
the full data's (the paper's unbiasedness argument).

The randomness is an input: ``u`` holds one U[0, 1) draw per sample, so the rule is a
deterministic function the harness can compare exactly, and a framework that draws its own is
checked in distribution against :func:`expectation`.  Two rules (``rule``):

* ``bernoulli`` (the paper): each well-learned sample is pruned independently, iff ``u_i < r``;
* ``exact_count`` (the official code, ``InfoBatch.prune``): exactly ``floor((1 - r) n_wl)`` of the
  ``n_wl`` well-learned samples are kept, chosen uniformly without replacement (here: those with
  the smallest draws).  The floor makes it biased: a well-learned sample's expected weight is
  ``floor((1 - r) n_wl) / ((1 - r) n_wl)``, below 1 unless ``(1 - r) n_wl`` is an integer.

Output: the weights (0 for a pruned sample).
"""

from __future__ import annotations

import math
from typing import Any

from reference._backend import device, namespace
from reference.registry import oracle_function

OP = "infobatch"


def _well_learned(scores: Any) -> Any:
    """H_i < mean(H): strictly below the mean (the official code's ``scores < scores.mean()``)."""
    xp = namespace(scores)
    return scores < xp.mean(scores)


def _kept_well_learned(well: Any, u: Any, keep: float, rule: str) -> Any:
    xp = namespace(u)
    if rule == "bernoulli":
        return well & (u >= 1.0 - keep)
    quota = math.floor(keep * int(xp.sum(xp.astype(well, xp.int64))))
    masked = xp.where(well, u, xp.full(u.shape, 2.0, dtype=u.dtype, device=device(u)))   # draws lie in [0, 1)
    rank = xp.argsort(xp.argsort(masked, stable=True), stable=True)     # 0 = the smallest draw
    return well & (rank < quota)


@oracle_function(OP)
def infobatch(scores: Any, u: Any, *, prune_ratio: float = 0.5, rule: str = "bernoulli") -> Any:
    if scores.ndim != 1 or scores.shape != u.shape:
        raise ValueError(f"{OP}: scores must be 1-D with one draw u per sample, got scores "
                         f"{tuple(scores.shape)} and u {tuple(u.shape)}")
    xp = namespace(scores)
    keep = 1.0 - prune_ratio
    well = _well_learned(scores)
    kept = _kept_well_learned(well, u, keep, rule)
    ones = xp.ones_like(scores)
    return xp.where(well, xp.where(kept, ones / keep, 0.0 * ones), ones)


def expectation(inputs: dict[str, Any], hparams: dict[str, Any]) -> dict[str, tuple[Any, Any, Any]]:
    """E[w_i] over the draws and the range of w_i: 1 for every sample under ``bernoulli``; under
    ``exact_count``, ``floor(k n_wl) / (k n_wl)`` for a well-learned sample (k = 1 - r)."""
    import numpy as np

    scores = np.asarray(inputs["scores"], dtype=np.float64)
    keep = 1.0 - hparams["prune_ratio"]
    well = scores < np.mean(scores)
    mean = np.ones_like(scores)
    if hparams["rule"] == "exact_count" and np.any(well):
        n_wl = int(np.sum(well))
        mean = np.where(well, math.floor(keep * n_wl) / (keep * n_wl), 1.0)
    high = np.where(well, 1.0 / keep, 1.0)
    return {"weights": (mean, np.where(well, 0.0, 1.0), high)}


def near_jumps(inputs: dict[str, Any], hparams: dict[str, Any], rel: float) -> dict[str, Any]:
    """Scores within ``rel`` of the mean (rounding decides "well learned"), and draws within
    ``rel`` of the threshold r (bernoulli) or, for exact_count, the two draws on either side of
    the quota when they are within ``rel`` of each other."""
    import numpy as np

    scores = np.asarray(inputs["scores"], dtype=np.float64)
    u = np.asarray(inputs["u"], dtype=np.float64)
    mean = np.mean(scores)
    scale = max(float(np.max(np.abs(scores))), 1e-300)
    near_mean = np.abs(scores - mean) <= rel * scale
    r = hparams["prune_ratio"]
    if hparams["rule"] == "bernoulli":
        near_u = np.abs(u - r) <= rel * max(r, 1e-300)
    else:
        # The quota keeps the draws below the gap between the quota-th and the next smallest
        # well-learned draw: rounding can swap those two only if they are within rel.
        well = scores < mean
        drawn = np.sort(u[well])
        quota = math.floor((1.0 - r) * int(np.sum(well)))
        near_u = np.zeros(u.shape, dtype=bool)
        if 0 < quota < drawn.size and drawn[quota] - drawn[quota - 1] <= rel * max(drawn[quota], 1e-300):
            near_u = well & ((u == drawn[quota - 1]) | (u == drawn[quota]))
        # A score near the mean changes n_wl, so the quota: every well-learned draw may move.
        if np.any(near_mean):
            near_u = near_u | well
    return {"scores": near_mean, "u": near_u}
