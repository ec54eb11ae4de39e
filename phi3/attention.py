"""Who attends to whom in one forward call, and the attention itself: cuDNN or flash attention on NVIDIA GPUs, SDPA
elsewhere.

Query i of a call (absolute position offset + i) sees key j iff
    j <= offset + i                      (causal)
    j >  offset + i - window             (the 4k models' sliding window, where it binds)
    document_ids[i] == document_ids[j]   (packing: no attention across examples; padding is a document of its own)

Three ways to compute it, chosen once per call by `Visibility.of`:
- cudnn: training and evaluation on a Hopper GPU in bf16/fp16 (no KV cache) with long, plainly causal rows (no packed
  documents, no window that binds): every unpacked long-context call of Phi-3-mini-128k and Phi-4-mini. cuDNN's
  kernels are 1.5x faster than flash attention 2 there on an H200 from 4,096 tokens a row on, but 1.2x slower at
  batch 4 x 2048 (bench/README.md), hence the length rule. They take grouped key/value heads as they are (Phi-4-mini's
  24 query heads over 8), as flash attention does: nothing is repeated.
- flash: the other calls of that kind. The batch's rows, or with packing its documents, become one list of
  sequences (cu_seqlens) for torch's flash-attention kernels with a left window. Unlike SDPA with a dense bool mask
  (2.7x slower than its causal path at T 2048 on an H200, and O(T^2) memory), it skips the masked blocks and needs
  no mask at all. Its output comes out (tokens, heads, hd): o_proj reads it with no copy.
- sdpa: everything else (CPU, fp32/fp64, decoding with a KV cache), with is_causal or a bool (B|1, 1, T, S) mask.
  This is also the reference the other two are tested against (tests/test_attention.py). On a GPU it never takes
  SDPA's cuDNN backend: cuDNN builds a plan for every new shape, and decoding's key length grows by one a token
  (1.07 ms of host time per layer per token on an H100: 60 % of decoding, bench/README.md).

Both GPU paths call torch's kernels through autograd Functions of their own, so that a checkpointed layer can keep
its attention output (and row log-sum-exp) from the forward pass for its recompute, instead of computing attention
a second time: at 131k tokens that recompute is a fifth of the step, at batch 4 x 2048 it still buys 1.03-1.05x.
Those outputs are as large as the layer's input, so they are kept only where the layer input itself waits in host
memory (phi3/offload.py), beside it; `keep_outputs = False` turns it off.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# The GPU paths call the ATen ops under torch.nn.attention.varlen.varlen_attn and SDPA's cuDNN path directly: their
# signatures are the same in torch 2.11 and 2.13, while varlen_attn's own (causal and GQA arguments) differ.
_FLASH_OPS = hasattr(torch.ops.aten, "_flash_attention_forward") and hasattr(torch.ops.aten, "_flash_attention_backward")
_CUDNN_OPS = hasattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention_backward")
use_flash = True  # bench/ ablations switch these off to measure what they buy
use_cudnn = True
# Kept attention outputs: 1.08-1.13x the long-context step at 16k-32k tokens on an H200 for 2-4 % more GPU memory,
# 1.03-1.05x at batch 4 x 2048 and 2 x 4096 on an H100 for 0.05 GiB (bench/README.md); bench/ ablations switch it off
keep_outputs = True
# Rows at least this long take cuDNN (1.5x faster from here on an H200, slower at batch 4 x 2048: bench/README.md)
cudnn_from_tokens = 4096
# SDPA's backends for the "sdpa" calls on a GPU: all but cuDNN (see the module docstring)
_SDPA_GPU = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


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


def cudnn_preferred(device: torch.device) -> bool:
    """Hopper (sm90) only: measured faster there; transformers PR #48163 found cuDNN slower than flash attention 2
    on Ampere and Blackwell, and this project has measured neither."""
    return use_cudnn and _CUDNN_OPS and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


def _keeper(seen: "Visibility", layer: int):
    """Where this layer's attention output is kept for its recompute, or None (see the module docstring)."""
    keeper = seen.keeper
    if keeper is None or not keep_outputs or not torch.is_grad_enabled():
        return None
    return keeper if keeper.holds_input_of(layer) else None


class Visibility:
    """The attention pattern of one forward call (see the module docstring), in the form its backend needs.

    Made once per forward by the model and handed to every layer (and through checkpoint recompute unchanged)."""

    def __init__(self, q_len: int, offset: int, window: int | None, backend: str, mask=None, cu_seqlens=None,
                 max_len: int = 0):
        self.q_len, self.offset, self.window, self.backend = q_len, offset, window, backend  # cudnn, flash or sdpa
        self.mask, self.cu_seqlens, self.max_len = mask, cu_seqlens, max_len  # max_len: the longest sequence
        self.keeper = None  # an OffloadedPass: the layers whose input it holds keep their attention output there

    @classmethod
    def of(cls, batch: int, q_len: int, offset: int, window: int | None, document_ids: torch.Tensor | None,
           dtype: torch.dtype, device: torch.device, head_dim: int, cached: bool = False) -> "Visibility":
        """cached: the call writes a KV cache (a prompt's prefill): its keys are views of the cache, not rope_qk's."""
        if offset == 0 and flash_supported(dtype, device, head_dim):
            plain_causal = document_ids is None and (window is None or q_len <= window)
            if plain_causal and not cached and q_len >= cudnn_from_tokens and cudnn_preferred(device):
                return cls(q_len, offset, window, "cudnn", max_len=q_len)
            cu_seqlens, max_len = sequence_starts(batch, q_len, document_ids)
            return cls(q_len, offset, window, "flash", cu_seqlens=cu_seqlens.to(device), max_len=max_len)
        return cls(q_len, offset, window, "sdpa", mask=attention_mask(q_len, offset, window, document_ids, device))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seen: Visibility, layer: int = 0) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd) + mask) v for q (B, nh, T, hd), k and v (B, nkv, S, hd) (GQA: nh a multiple of nkv);
    returns (B, T, nh * hd), o_proj's input. `layer`: whose output this is, for keeping it (see the docstring)."""
    B, nh, T, hd = q.shape
    if seen.backend == "flash":
        tokens = lambda t: t.transpose(1, 2).reshape(B * T, t.shape[1], hd)  # a view for rope_qk's outputs
        left = seen.window - 1 if seen.window is not None else -1  # keys i - (window - 1) .. i
        y = FlashAttention.apply(tokens(q), tokens(k), tokens(v), seen.cu_seqlens, seen.max_len, left,
                                 _keeper(seen, layer), layer)
        return y.view(B, T, nh * hd)
    if seen.backend == "cudnn":
        y = CudnnAttention.apply(q, k, v, _keeper(seen, layer), layer)  # (B, nh, T, hd) over (B, T, nh, hd) memory
        return y.transpose(1, 2).reshape(B, T, nh * hd)
    is_causal = isinstance(seen.mask, str)
    with sdpa_kernel(_SDPA_GPU) if q.is_cuda else contextlib.nullcontext():
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if is_causal else seen.mask, is_causal=is_causal,
                                           enable_gqa=k.shape[1] != nh)  # scale 1/sqrt(hd)
    return y.transpose(1, 2).reshape(B, T, nh * hd)


class FlashAttention(torch.autograd.Function):
    """Causal flash attention over packed sequences: q (N, nh, hd), k and v (N, nkv, hd), cu_seqlens (n_seq + 1,)
    int32; each query sees the keys of its own sequence from `left` positions back (-1: all) to itself.
    Saves q, k, v, the output and the row log-sum-exp (fp32, N x nh): the backward recomputes the probabilities.
    With a keeper (an OffloadedPass), the first call for `layer` keeps the output and log-sum-exp there and the
    recompute's call takes them back instead of computing them again (with no dropout in attention the op draws
    nothing from the random generator, so skipping it leaves the recompute's later dropout masks as they were)."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_len, left, keeper, layer):
        kept = keeper.take_kept(layer) if keeper is not None else None
        if kept is None:
            out, lse, rng_state, unused, _ = torch.ops.aten._flash_attention_forward(
                q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, 0.0, True, False,
                window_size_left=left, window_size_right=0)
            if keeper is not None:
                keeper.keep(layer, (out, lse, rng_state, unused))
        else:
            out, lse, rng_state, unused = kept
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, rng_state, unused)
        ctx.max_len, ctx.left = max_len, left
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, cu_seqlens, rng_state, unused = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad_out.contiguous(), q, k, v, out, lse, cu_seqlens, cu_seqlens, ctx.max_len, ctx.max_len, 0.0, True,
            rng_state, unused, window_size_left=ctx.left, window_size_right=0)
        return dq, dk, dv, None, None, None, None, None


class CudnnAttention(torch.autograd.Function):
    """Causal attention by cuDNN over whole rows: q (B, nh, T, hd), k and v (B, nkv, T, hd), nh a multiple of nkv
    (cuDNN reads each key/value head for its group of query heads, and its backward sums their dk, dv). It saves
    and keeps what FlashAttention does; the ops are those SDPA's cuDNN path calls, called directly so that the
    forward can be skipped."""

    @staticmethod
    def forward(ctx, q, k, v, keeper, layer):
        kept = keeper.take_kept(layer) if keeper is not None else None
        if kept is None:
            out, lse, _, _, _, _, seed, offset, _ = torch.ops.aten._scaled_dot_product_cudnn_attention(
                q, k, v, None, True, 0.0, True, False)
            if keeper is not None:  # out in its own memory order, (B, T, nh, hd): it comes back with the same strides
                keeper.keep(layer, (out.transpose(1, 2), lse, seed, offset))
        else:
            out_tokens, lse, seed, offset = kept
            out = out_tokens.transpose(1, 2)
        ctx.save_for_backward(q, k, v, out, lse, seed, offset)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, seed, offset = ctx.saved_tensors
        T = q.shape[2]
        dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            grad_out, q, k, v, out, lse, seed, offset, None, None, None, T, T, 0.0, True)
        return dq, dk, dv, None, None
