"""Who attends to whom in one forward call, and the attention itself: flash attention on NVIDIA GPUs, SDPA elsewhere.

Query i of a call (absolute position offset + i) sees key j iff
    j <= offset + i                      (causal)
    j >  offset + i - window             (the 4k models' sliding window, where it binds)
    document_ids[i] == document_ids[j]   (packing: no attention across examples; padding is a document of its own)

Two ways to compute it, chosen once per call by `Visibility.of`:
- flash: training and evaluation on a CUDA GPU in bf16/fp16 (no KV cache). The batch's rows, or with packing its
  documents, become one list of sequences (cu_seqlens) for torch's flash-attention kernels with a left window. Unlike
  SDPA with a dense bool mask (2.7x slower than its causal path at T 2048 on an H200, and O(T^2) memory), it skips
  the masked blocks and needs no mask at all. Its output comes out (tokens, heads, hd): o_proj reads it with no copy.
- sdpa: everything else (CPU, fp32/fp64, decoding with a KV cache), with is_causal or a bool (B|1, 1, T, S) mask.
  This is also the reference the flash path is tested against (tests/test_attention.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The flash path calls the ATen ops under torch.nn.attention.varlen.varlen_attn directly: their signatures are the
# same in torch 2.11 and 2.13, while varlen_attn's own (causal and GQA arguments) differ between the two.
_FLASH_OPS = hasattr(torch.ops.aten, "_flash_attention_forward") and hasattr(torch.ops.aten, "_flash_attention_backward")
use_flash = True  # bench/ ablations switch it off to measure what it buys


def flash_supported(dtype: torch.dtype, device: torch.device, head_dim: int) -> bool:
    """Whether torch's flash kernels take this call: CUDA, sm80 or newer, 16-bit, head_dim a multiple of 8 <= 256."""
    if not (use_flash and _FLASH_OPS and device.type == "cuda" and torch.version.cuda is not None):
        return False
    return (dtype in (torch.float16, torch.bfloat16) and head_dim % 8 == 0 and head_dim <= 256
            and torch.cuda.get_device_capability(device)[0] >= 8)


def attention_mask(q_len: int, offset: int, sliding_window: int | None, document_ids: torch.Tensor | None,
                   device) -> torch.Tensor | str | None:
    """The mask SDPA needs: "causal" (use is_causal), None (all keys visible) or a bool (B|1, 1, T, S) tensor."""
    k_len = offset + q_len
    window_binds = sliding_window is not None and k_len > sliding_window
    if document_ids is None and not window_binds:
        if q_len == 1:
            return None
        if offset == 0:
            return "causal"
    q_pos = torch.arange(offset, k_len, device=device)[:, None]
    k_pos = torch.arange(k_len, device=device)[None, :]
    mask = k_pos <= q_pos
    if window_binds:
        mask = mask & (k_pos > q_pos - sliding_window)
    mask = mask[None, None]  # (1, 1, T, S)
    if document_ids is not None:
        mask = mask & (document_ids[:, None, :, None] == document_ids[:, None, None, :])
    return mask


def sequence_starts(batch: int, length: int, document_ids: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """cu_seqlens (int32, first 0, last batch * length) of the flattened (batch * length) tokens cut into sequences:
    one per row, or with document_ids one per run of equal ids in a row; and the longest sequence's length."""
    n = batch * length
    if document_ids is None:
        return torch.arange(0, n + 1, length, dtype=torch.int32, device="cpu"), length
    ids = document_ids.reshape(-1)
    new = torch.ones(n, dtype=torch.bool, device=ids.device)
    new[1:] = ids[1:] != ids[:-1]
    new[::length] = True  # every row starts a sequence, even if its first id equals the last row's last one
    starts = torch.cat([new.nonzero().flatten(), torch.tensor([n], device=ids.device)])  # one host sync per call
    return starts.to(torch.int32), int((starts[1:] - starts[:-1]).max())


class Visibility:
    """The attention pattern of one forward call (see the module docstring), in the form its backend needs.

    Made once per forward by the model and handed to every layer (and through checkpoint recompute unchanged)."""

    def __init__(self, q_len: int, offset: int, window: int | None, flash: bool, mask=None, cu_seqlens=None,
                 max_len: int = 0):
        self.q_len, self.offset, self.window, self.flash = q_len, offset, window, flash
        self.mask, self.cu_seqlens, self.max_len = mask, cu_seqlens, max_len

    @classmethod
    def of(cls, batch: int, q_len: int, offset: int, window: int | None, document_ids: torch.Tensor | None,
           dtype: torch.dtype, device: torch.device, head_dim: int) -> "Visibility":
        if offset == 0 and flash_supported(dtype, device, head_dim):
            cu_seqlens, max_len = sequence_starts(batch, q_len, document_ids)
            return cls(q_len, offset, window, True, cu_seqlens=cu_seqlens.to(device), max_len=max_len)
        return cls(q_len, offset, window, False, mask=attention_mask(q_len, offset, window, document_ids, device))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seen: Visibility) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd) + mask) v for q (B, nh, T, hd), k and v (B, nkv, S, hd) (GQA: nh a multiple of nkv);
    returns (B, T, nh * hd), o_proj's input."""
    B, nh, T, hd = q.shape
    if seen.flash:
        tokens = lambda t: t.transpose(1, 2).reshape(B * T, t.shape[1], hd)  # a view for rope_qk's outputs
        left = seen.window - 1 if seen.window is not None else -1  # keys i - (window - 1) .. i
        y = FlashAttention.apply(tokens(q), tokens(k), tokens(v), seen.cu_seqlens, seen.max_len, left)
        return y.view(B, T, nh * hd)
    is_causal = isinstance(seen.mask, str)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if is_causal else seen.mask, is_causal=is_causal,
                                       enable_gqa=k.shape[1] != nh)  # scale 1/sqrt(hd)
    return y.transpose(1, 2).reshape(B, T, nh * hd)


class FlashAttention(torch.autograd.Function):
    """Causal flash attention over packed sequences: q (N, nh, hd), k and v (N, nkv, hd), cu_seqlens (n_seq + 1,)
    int32; each query sees the keys of its own sequence from `left` positions back (-1: all) to itself.
    Saves q, k, v, the output and the row log-sum-exp (fp32, N x nh): the backward recomputes the probabilities."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_len, left):
        out, lse, rng_state, unused, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, 0.0, True, False,
            window_size_left=left, window_size_right=0)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, rng_state, unused)
        ctx.max_len, ctx.left = max_len, left
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, cu_seqlens, rng_state, unused = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad_out.contiguous(), q, k, v, out, lse, cu_seqlens, cu_seqlens, ctx.max_len, ctx.max_len, 0.0, True,
            rng_state, unused, window_size_left=ctx.left, window_size_right=0)
        return dq, dk, dv, None, None, None
