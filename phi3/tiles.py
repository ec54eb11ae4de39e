"""A function run in token tiles inside a checkpointed layer, so that one tile's activations exist at a time.

The MLP at 131,072 tokens would hold gate_up's output alone at 4 GiB (Phi-3-mini), so above MLP.tile_tokens it runs
in tiles of rows. In a checkpointed layer each tile must also be recomputed on its own in the backward pass. Nested
checkpoints (one per tile) do that, but the layer's own recompute then runs every tile's forward once more just to
build those checkpoints, and throws the result away: one gate_up GEMM per tile wasted, about 4 % of a 65k-token step.

`in_tiles` is one autograd node for all tiles instead: the layer's first run computes the output tile by tile and
keeps nothing; the layer's recompute computes nothing (its output only joins the residual sum, which a recompute
throws away); the node's backward runs each tile again, with the random numbers of the first run (dropout), and
back-propagates through it before the next. So the tile's forward runs twice, as in a layer without tiles.

    out = in_tiles(mlp.untiled, h, sizes=token_tiles(tokens, 16384), width=hidden, params=trainable)
"""
from __future__ import annotations

import torch

from phi3.recompute import inner_run, recomputing


def token_tiles(tokens: int, tile: int) -> list[int]:
    """The sizes of the tiles `tokens` tokens are cut into: whole tiles, then the rest (one tile if they fit)."""
    return [min(tile, tokens - start) for start in range(0, tokens, tile)]


def in_tiles(function, x: torch.Tensor, sizes: list[int], width: int, params: list[torch.Tensor]) -> torch.Tensor:
    """function(x) for x (tokens, features) -> (tokens, width), applied to row tiles of `sizes` (see the module
    docstring). params: the tensors besides x that function's result depends on and that need a gradient."""
    return _InTiles.apply(function, sizes, width, x, *params)


class _InTiles(torch.autograd.Function):
    @staticmethod
    def forward(ctx, function, sizes, width, x, *params):
        ctx.function, ctx.sizes, ctx.params = function, sizes, params
        ctx.save_for_backward(x)  # (a checkpoint's hooks hold nothing for it in the first run)
        if recomputing():  # nothing reads this output: the layer's recompute runs only for what its backward saves
            return x.new_zeros(()).expand(x.shape[0], width)
        ctx.rng = rng_states(x.device)  # the tiles' dropout draws, replayed in the backward
        out = x.new_empty(x.shape[0], width)
        with inner_run(recompute=False):
            for rows, tile in zip(out.split(sizes), x.split(sizes)):
                rows.copy_(function(tile))
        return out

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        dx = torch.empty_like(x) if ctx.needs_input_grad[3] else None
        dparams, start = [None] * len(ctx.params), 0
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []), inner_run(recompute=True):
            restore_rng_states(ctx.rng, x.device)
            for size in ctx.sizes:  # in the first run's order: the same dropout draws
                rows, start = slice(start, start + size), start + size
                tile = x[rows].detach().requires_grad_(dx is not None)
                with torch.enable_grad():
                    out = ctx.function(tile)
                inputs = ([tile] if dx is not None else []) + list(ctx.params)
                grads = list(torch.autograd.grad(out, inputs, grad[rows], allow_unused=True))
                if dx is not None:
                    dx[rows] = grads.pop(0)
                dparams = [g if total is None else total if g is None else total + g
                           for total, g in zip(dparams, grads)]
        return (None, None, None, dx, *dparams)


def rng_states(device: torch.device) -> tuple:
    """The generators the tiles draw from: the CPU's (the kernels' dropout seeds) and the GPU's (torch's dropout)."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def restore_rng_states(states: tuple, device: torch.device) -> None:
    cpu, gpu = states
    torch.set_rng_state(cpu)
    if gpu is not None:
        torch.cuda.set_rng_state(gpu, device)
