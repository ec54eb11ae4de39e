"""The adapter layers: each wraps a frozen layer of the model, computes what peft computes for the same adapter, and
merges into the layer's weight on request (never as a side effect of .eval()). phi3/lora.py adds them to a model,
phi3/peft_files.py saves and loads them in peft's layout.

    LoRALinear       y = x W^T + s dropout(x) A^T B^T; with DoRA g (x (W + s B A)^T), g = m / ||W + s B A||
    LoRAEmbedding    e = W[ids] + s A^T[ids] B^T (loralib's embedding LoRA)
    TrainableTokens  W with a few tokens' rows replaced by trained ones (peft's trainable_token_indices)

Each keeps the base layer's own W (no copy) under the checkpoint's name (`qkv_proj.weight`), so merged models save in
the Hugging Face layout unchanged, and trains fp32 parameters named lora_* (mark_only_lora_as_trainable's rule).

On a tied model (lm_head's weight is the embedding's: the embedded tiny model, Phi-4-mini) each does what peft does by
default (without ensure_weight_tying):
- LoRA on lm_head changes the output projection only, LoRA on the embedding the input embedding only: the other
  keeps computing with W. Merging either therefore unties: the merged layer gets a weight of its own.
- Trainable token rows are shared: the embedding and lm_head both use them (peft ties them). Merging writes them into
  the one W and the model stays tied.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from phi3.ops import dora_linear, dora_weight_norm, fp8_lora_linear, lora_linear, qlora_linear
from phi3.quantized import NF4Linear
from phi3.recompute import kept_slot


def keep_or_untie(module: nn.Module, merged: torch.Tensor) -> None:
    """Write a merged weight into `module.weight`: in place, or, where W is also another layer's (`module.tied`: a
    tied embedding and lm_head), as a weight of the module's own; W waits in `module.shared` for unmerge
    (unregistered: not a second state_dict entry)."""
    if module.tied:
        module.shared, module.weight = (module.weight,), nn.Parameter(merged, requires_grad=False)
    else:
        module.weight.copy_(merged)


def retie(module: nn.Module) -> None:
    """Undo keep_or_untie for a tied module: the shared W, exactly as it was."""
    (module.weight,), module.shared = module.shared, ()


class LoRALinear(nn.Module):
    """y = x W^T + scale * dropout(x) A^T B^T, W frozen; A (n*r, in) and B (out, r) per slice, in fp32.

    `slices` are the output row ranges that get an adapter (one range = the whole layer). The full B is
    block-diagonal: rows of slice i only see columns i*r..(i+1)*r of the stacked A.

    dora: a magnitude m (fp32, one per row of the slices, starting at ||W + s B A|| = ||W||, so the layer starts as
    the base) and the output computed as peft's DoRA (phi3/ops.py dora_linear): g = m / ||W + s B A|| row-wise."""

    def __init__(self, base: nn.Linear, rank: int, scale: float, dropout: float, slices: list[tuple[int, int]],
                 rslora: bool = False, tied: bool = False, dora: bool = False):
        super().__init__()
        # tied: W is also the input embedding (a tied lm_head, Phi-4-mini's). As in peft, the adapter changes the
        # output projection only; merging gives lm_head a weight of its own instead of changing the embedding.
        self.tied, self.shared = tied, ()  # merged tied: (W,), unregistered (not a second state_dict entry)
        self.rslora = rslora  # only recorded for the exported adapter_config; the scale already includes it
        self.in_features, self.out_features = base.in_features, base.out_features
        self.base4 = base if isinstance(base, NF4Linear) else None  # a 4-bit base (QLoRA): W stays in NF4
        self.weight = None if self.base4 else base.weight  # the base layer's own tensor, frozen: no copy
        if self.weight is not None:
            self.weight.requires_grad_(False)
        self.rank, self.scale, self.dropout, self.slices = rank, scale, dropout, slices
        device = base.packed.device if self.base4 else base.weight.device
        self.lora_A = nn.Parameter(torch.empty(len(slices) * rank, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(sum(e - s for s, e in slices), rank, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear and peft; B = 0 -> starts at the base
        self._norm = None  # DoRA: (its inputs, ||W + s B A||), see dora_norm
        self.lora_magnitude = nn.Parameter(self.slice_rows(self.dora_norm())) if dora else None
        self.merged, self.merged_scale = False, None
        self.fp8 = None  # W in FP8 for the base's GEMMs (phi3/lora.py use_fp8, train.py --fp8); W itself stays
        self.train(base.training)  # an adapter added to a model in eval mode has no dropout: as the layer it wraps

    @property
    def whole(self) -> bool:
        return self.slices == [(0, self.out_features)]

    def frozen_weight(self):
        return self.base4.weight4 if self.base4 is not None else self.weight

    def full_B(self) -> torch.Tensor:
        """B as one (out, n*r) matrix: the layer's B itself, or the slices' Bs placed block-diagonally."""
        if self.whole:
            return self.lora_B
        full = self.lora_B.new_zeros(self.out_features, len(self.slices) * self.rank)
        row = 0
        for i, (start, end) in enumerate(self.slices):
            full[start:end, i * self.rank:(i + 1) * self.rank] = self.lora_B[row:row + end - start]
            row += end - start
        return full

    def slice_rows(self, values: torch.Tensor) -> torch.Tensor:
        """The slices' rows of an (out,) vector, stacked in slice order (as lora_B's rows)."""
        return values if self.whole else torch.cat([values[s:e] for s, e in self.slices])

    def full_magnitude(self, norm: torch.Tensor) -> torch.Tensor:
        """m as an (out,) vector: the slices' rows from lora_magnitude, the other rows `norm` (their factor 1)."""
        if self.whole:
            return self.lora_magnitude
        pieces, start, row = [], 0, 0
        for s, e in self.slices:
            pieces += [norm[start:s], self.lora_magnitude[row:row + e - s]]
            start, row = e, row + e - s
        return torch.cat(pieces + [norm[start:]])

    def dora_norm(self, full_B: torch.Tensor | None = None) -> torch.Tensor:
        """||W + s B A|| per output row (out,), fp32, no gradient (peft detaches it). Kept while W, A and B are
        unchanged, so a checkpointed layer's recompute and every decoding step reuse it instead of reading W again."""
        key = self._norm_inputs()
        if self._norm is None or self._norm[0] != key:
            B = self.full_B() if full_B is None else full_B
            self._norm = key, dora_weight_norm(self.frozen_weight(), self.lora_A, B, self.scale)
        return self._norm[1]

    def _norm_inputs(self) -> tuple:
        """What the norm is computed from: each tensor's device, storage and version counter (an in-place update,
        an optimizer step or a load, bumps the version; `.to()` or a new tensor changes the storage), and s."""
        W = self.base4.packed if self.base4 is not None else self.weight
        return tuple((t.device, t.data_ptr(), t._version) for t in (self.lora_A, self.lora_B, W)) + (self.scale,)

    def dora_scale(self, full_B: torch.Tensor | None = None) -> torch.Tensor:
        """DoRA's g = m / ||W + s B A|| per output row (out,), fp32; the gradient reaches m only."""
        norm = self.dora_norm(full_B)
        return self.full_magnitude(norm) / norm

    def forward(self, x: torch.Tensor, output: bool = True, keep_output: bool = True) -> torch.Tensor:
        """output=False (backward_inputs): see there. keep_output=False: a checkpointed layer that keeps its outputs
        for the recompute (phi3/recompute.py) keeps none of this one's (the recompute calls backward_inputs)."""
        if self.merged:
            return F.linear(x, self.weight)
        p, B = self.dropout if self.training else 0.0, self.full_B()
        if self.lora_magnitude is not None:  # (DoRA's backward needs x W^T: always computed)
            return dora_linear(x, self.frozen_weight(), self.lora_A, B, self.scale, self.dora_scale(B), p)
        if self.fp8 is not None:
            op, W = fp8_lora_linear, self.fp8
        else:
            op, W = qlora_linear if self.base4 is not None else lora_linear, self.frozen_weight()
        return op(x, W, self.lora_A, B, self.scale, dropout_p=p, training=self.training, output=output,
                  **self._kept_args(keep_output))

    @property
    def keeps(self) -> bool:
        """Whether a checkpointed layer's first run keeps this layer's S for the recompute (DoRA's norm-scaled kernels
        do not take it)."""
        return self.lora_magnitude is None and not self.merged

    @property
    def keeps_output(self) -> bool:
        """Whether it may keep its output too: not on a 4-bit base, whose user chose the least memory over speed."""
        return self.keeps and self.base4 is None

    def _kept_args(self, keep_output: bool) -> dict:
        """In a checkpointed layer that keeps (phi3/recompute.py Kept): the first run's keep, the recompute's reuse."""
        slot = kept_slot()
        if slot is None or not self.keeps:
            return {}
        kept, recompute = slot
        if recompute:
            return {"reuse": kept.take(self)}
        return {"keep": lambda s, y: kept.keep(self, s, y if keep_output and self.keeps_output else None)}

    def backward_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """forward(x) for its backward only: what the layer saves is computed and saved as forward(x) would, but the
        kernels skip x W^T and return uninitialized memory. For a recompute whose output nothing reads
        (phi3/recompute.py)."""
        return self(x, output=False)

    @torch.no_grad()
    def delta(self) -> torch.Tensor:
        return self.scale * (self.full_B().float() @ self.lora_A.float())  # (out, in), fp32

    @torch.no_grad()
    def merge(self) -> None:
        """W' = W + s B A, or with DoRA peft's W' = g (W + s B A) row-wise, g from the unmerged W."""
        if self.base4 is not None:
            raise ValueError("a LoRA layer on a 4-bit base does not merge (W + s B A would be rounded to 4 bits again):"
                             " load the model in 16 bits, load the adapter there, then merge")
        if self.merged:
            return
        self.fp8 = None  # made from the unmerged W
        merged = self.weight.float() + self.delta()
        if self.lora_magnitude is not None:
            self.merged_scale = self.dora_scale().detach()
            merged = self.merged_scale.unsqueeze(1) * merged
        keep_or_untie(self, merged.to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo merge (exact in fp32 up to roundings; in bf16 the weight keeps the rounding of the merge)."""
        if not self.merged:
            return
        if self.tied:
            retie(self)
        else:
            weight = self.weight.float()
            if self.merged_scale is not None:
                weight = weight / self.merged_scale.unsqueeze(1)
            self.weight.copy_((weight - self.delta()).to(self.weight.dtype))
        self.merged, self.merged_scale = False, None

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}, slices={len(self.slices)}, "
                f"scale={self.scale:g}" + (", dora" if self.lora_magnitude is not None else ""))


class LoRAEmbedding(nn.Module):
    """e = W[ids] + scale * (A^T[ids] B^T): loralib's LoRA on an embedding, in peft's layout. lora_embedding_A
    (r, vocab) starts at zero (the model is unchanged until trained), lora_embedding_B (dim, r) standard normal, both
    fp32; no dropout (peft applies none to embeddings). W stays frozen. A's lookup uses W's padding_idx, as peft's
    does: the pad token's column of A gets no gradient.

    tied: W is also lm_head's (a tied model): the adapter changes the input embedding only, as in peft."""

    def __init__(self, base: nn.Embedding, rank: int, scale: float, rslora: bool = False, tied: bool = False):
        super().__init__()
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim
        self.padding_idx = base.padding_idx
        self.weight = base.weight.requires_grad_(False)  # the base layer's own tensor: no copy
        self.rank, self.scale, self.rslora, self.tied, self.shared = rank, scale, rslora, tied, ()
        device = base.weight.device
        self.lora_embedding_A = nn.Parameter(torch.zeros(rank, self.num_embeddings, device=device))
        self.lora_embedding_B = nn.Parameter(torch.randn(self.embedding_dim, rank, device=device))
        self.merged = False
        self.train(base.training)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = F.embedding(ids, self.weight, self.padding_idx)
        if self.merged:
            return out
        after_A = F.embedding(ids, self.lora_embedding_A.t(), self.padding_idx)  # (B, T, r), fp32
        return (out + (after_A @ self.lora_embedding_B.t()) * self.scale).to(out.dtype)  # peft's order and dtypes

    @torch.no_grad()
    def delta(self) -> torch.Tensor:
        return self.scale * (self.lora_embedding_B.float() @ self.lora_embedding_A.float()).t()  # (vocab, dim), fp32

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            keep_or_untie(self, (self.weight.float() + self.delta()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        if self.tied:
            retie(self)
        else:
            self.weight.copy_((self.weight.float() - self.delta()).to(self.weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return f"vocab={self.num_embeddings}, dim={self.embedding_dim}, rank={self.rank}, scale={self.scale:g}"


class TrainableTokens(nn.Module):
    """The rows of a few tokens in the embedding (or in lm_head) trained on their own, W frozen: peft's
    trainable_token_indices. The layer computes with W whose rows `token_ids` are replaced by `lora_token_rows`
    (fp32, starting as W's own rows: the model is unchanged until trained), rounded to W's dtype as peft does.

    tied_to: lm_head of a tied model uses the embedding's rows, which stay registered there only. The pad token's
    row gets no gradient through the embedding, as peft's F.embedding(padding_idx) gives it none."""

    tied = False  # merging writes the rows into W itself, shared or not: it never unties

    def __init__(self, base: nn.Embedding | nn.Linear, token_ids: list[int], tied_to: TrainableTokens | None = None):
        super().__init__()
        self.weight = base.weight.requires_grad_(False)
        self.is_head = isinstance(base, nn.Linear)
        self.padding_idx = None if self.is_head else base.padding_idx
        self.token_ids = [int(i) for i in token_ids]
        device = self.weight.device
        self.register_buffer("index", torch.tensor(self.token_ids, dtype=torch.long, device=device), persistent=False)
        self.source = (tied_to,) if tied_to is not None else ()  # a tuple: not a submodule, its rows not saved twice
        if tied_to is None:
            self.lora_token_rows = nn.Parameter(self.weight.detach()[self.index].float().clone())
        if not self.is_head:  # token id -> its row in lora_token_rows, -1 for every other token
            slot = torch.full((self.weight.shape[0],), -1, dtype=torch.long, device=device)
            slot.index_copy_(0, self.index, torch.arange(len(self.token_ids), device=device))
            self.register_buffer("slot", slot, persistent=False)
        self.merged, self.originals = False, None
        self.train(base.training)

    def rows(self) -> torch.Tensor:
        return self.source[0].lora_token_rows if self.source else self.lora_token_rows

    def is_merged(self) -> bool:
        return self.source[0].merged if self.source else self.merged

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_head:
            logits = F.linear(x, self.weight)
            if self.is_merged():
                return logits
            # the trained rows' logits replace W's (F.linear keeps no output for its backward: in place is safe)
            return logits.index_copy_(-1, self.index, F.linear(x, self.rows().to(x.dtype)))
        out = F.embedding(x, self.weight, self.padding_idx)
        if self.is_merged():
            return out
        rows = self.rows()
        if self.padding_idx in self.token_ids:
            rows = torch.where((self.index == self.padding_idx).unsqueeze(-1), rows.detach(), rows)
        slot = self.slot[x]  # (B, T)
        picked = F.embedding(slot.clamp(min=0), rows.to(out.dtype))  # a trained row per position (any for the rest)
        return torch.where((slot >= 0).unsqueeze(-1), picked, out)

    @torch.no_grad()
    def merge(self) -> None:
        """W's rows become the trained rows (in place: on a tied model the tied lm_head's rows are the same rows)."""
        if self.source or self.merged:
            return
        self.originals = self.weight[self.index].clone()
        self.weight.index_copy_(0, self.index, self.lora_token_rows.to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.index_copy_(0, self.index, self.originals)
            self.merged, self.originals = False, None

    def extra_repr(self) -> str:
        return (f"{'lm_head' if self.is_head else 'embedding'} rows of {len(self.token_ids)} tokens"
                + (", tied to the embedding's" if self.source else ""))


ADAPTERS = (LoRALinear, LoRAEmbedding, TrainableTokens)


def adapter_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every adapter layer of a model: LoRALinear, LoRAEmbedding, TrainableTokens."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ADAPTERS)}


def check_token_ids(token_ids, vocab_size: int) -> list[int]:
    """Distinct ints in [0, vocab_size), at least one; ValueError saying which is not."""
    ids = list(token_ids)
    bad = next((i for i in ids if type(i) is not int or not 0 <= i < vocab_size), None)
    if not ids or bad is not None or len(set(ids)) != len(ids):
        problem = ("none given" if not ids else f"{bad!r} is not a token id of the model (0..{vocab_size - 1})"
                   if bad is not None else "an id is given twice")
        raise ValueError(f"trainable token ids: {problem}; give distinct ids below the vocabulary size")
    return ids
