"""Next-token cross-entropy over the trained positions only, in chunks, without the full logits tensor.

Only positions with a label (labels != -100) go through lm_head, in chunks of `chunk` rows; each chunk's
fp32 logits are recomputed in the backward pass (activation checkpointing) instead of being kept, so
memory holds at most one chunk of (chunk, vocab) logits at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100


def _chunk_loss(lm_head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = lm_head(hidden).float()  # (n, vocab); the loss upcasts, as the reference does
    return F.cross_entropy(logits, targets, reduction="sum")


def cross_entropy_sum(hidden: torch.Tensor, lm_head: torch.nn.Module, labels: torch.Tensor,
                      chunk: int = 4096) -> torch.Tensor:
    """Sum of token losses over labelled positions. hidden (B, T, H), labels (B, T) already shifted."""
    keep = labels.reshape(-1) != IGNORE
    h = hidden.reshape(-1, hidden.shape[-1])[keep]  # (n_trained, H)
    targets = labels.reshape(-1)[keep]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], chunk):
        args = (lm_head, h[start:start + chunk], targets[start:start + chunk])
        if torch.is_grad_enabled() and h.requires_grad:
            total = total + checkpoint(_chunk_loss, *args, use_reentrant=False)
        else:
            total = total + _chunk_loss(*args)
    return total
