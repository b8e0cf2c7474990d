"""Loss functions shared by every distiller (one place, no per-method copies).

All logit distances take raw logits ``(N, K)`` and return a scalar averaged over the
batch, computed in float32 from ``log_softmax`` (no log of a zero probability).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def _log_probs(logits: Tensor, T: float) -> Tensor:
    return F.log_softmax(logits.float() / T, dim=1)


def kd_loss(logits_s: Tensor, logits_t: Tensor, T: float) -> Tensor:
    """Hinton KD: ``T^2 * mean_n KL(softmax(z_t/T) || softmax(z_s/T))``."""
    log_ps = _log_probs(logits_s, T)
    log_pt = _log_probs(logits_t, T)
    return F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True) * (T * T)


def standardize(logits: Tensor, eps: float = 1e-7) -> Tensor:
    """z-score each row of logits (logit-standardised KD)."""
    logits = logits.float()
    mean = logits.mean(dim=1, keepdim=True)
    std = logits.std(dim=1, keepdim=True)
    return (logits - mean) / (std + eps)


def lskd_loss(logits_s: Tensor, logits_t: Tensor, T: float) -> Tensor:
    """KD on z-scored logits (logit standardisation before the softmax)."""
    return kd_loss(standardize(logits_s), standardize(logits_t), T)


def _binary_log_probs(log_p: Tensor, gt_mask: Tensor) -> Tensor:
    """Log of ``[p_gt, 1 - p_gt]`` from full log-probabilities, stably."""
    log_p_gt = (log_p * gt_mask).sum(dim=1, keepdim=True)
    log_p_other = torch.logsumexp(log_p.masked_fill(gt_mask.bool(), float("-inf")), dim=1, keepdim=True)
    return torch.cat([log_p_gt, log_p_other], dim=1)


def dkd_parts(logits_s: Tensor, logits_t: Tensor, target: Tensor, T: float):
    """Return ``(TCKD, NCKD)`` of Decoupled KD, each ``T^2 * batch-mean KL``."""
    gt_mask = torch.zeros_like(logits_s, dtype=torch.float32).scatter_(1, target.unsqueeze(1), 1.0)
    log_ps = _log_probs(logits_s, T)
    log_pt = _log_probs(logits_t, T)
    b_s, b_t = _binary_log_probs(log_ps, gt_mask), _binary_log_probs(log_pt, gt_mask)
    tckd = F.kl_div(b_s, b_t, reduction="batchmean", log_target=True) * (T * T)
    # non-target distribution: softmax(z/T - 1000 * 1[gt])
    mask = gt_mask * 1000.0
    nlog_ps = F.log_softmax(logits_s.float() / T - mask, dim=1)
    nlog_pt = F.log_softmax(logits_t.float() / T - mask, dim=1)
    nckd = F.kl_div(nlog_ps, nlog_pt, reduction="batchmean", log_target=True) * (T * T)
    return tckd, nckd


def dkd_loss(logits_s: Tensor, logits_t: Tensor, target: Tensor, alpha: float, beta: float, T: float) -> Tensor:
    """Decoupled KD: ``alpha * TCKD + beta * NCKD``."""
    tckd, nckd = dkd_parts(logits_s, logits_t, target, T)
    return alpha * tckd + beta * nckd


def hcl_loss(feats_s: Sequence[Tensor], feats_t: Sequence[Tensor]) -> Tensor:
    """ReviewKD's hierarchical context loss, summed over levels.

    Per level: ``[MSE(F_s, F_t) + sum_k 2^-k MSE(pool_k F_s, pool_k F_t)] / (1 + sum_k 2^-k)``
    over adaptive average pools of size 4, 2, 1 that are smaller than the map.
    """
    total = 0.0
    for fs, ft in zip(feats_s, feats_t):
        fs, ft = fs.float(), ft.float()
        h = fs.shape[2]
        loss = F.mse_loss(fs, ft)
        cnt, tot = 1.0, 1.0
        for size in (4, 2, 1):
            if size >= h:
                continue
            cnt /= 2.0
            loss = loss + cnt * F.mse_loss(F.adaptive_avg_pool2d(fs, size), F.adaptive_avg_pool2d(ft, size))
            tot += cnt
        total = total + loss / tot
    return total


def warmup_factor(epoch, warmup) -> float:
    """Linear warm-up ``min(epoch / warmup, 1)``; 1 when ``warmup`` is 0."""
    if not warmup:
        return 1.0
    return min(float(epoch) / float(warmup), 1.0)
