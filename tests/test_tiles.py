"""phi3/tiles.py: the MLP in token tiles inside a checkpointed layer. Its gradients, dropout included, are bit for
bit those of running the tiles plainly inside the checkpoint (which holds every tile's activations at once), and
each tile's forward runs twice per step, as an untiled layer's does: once in the forward, once in the backward (the
layer's own recompute runs none)."""
import pytest
import torch

import phi3.lora_layers
from phi3.kernels import launch
from phi3.kernels import lora_linear as lora_kernels
from phi3.model import MLP, Recompute
from phi3.tiles import in_tiles, token_tiles
from test_offload import gradients, lora_model


def test_in_tiles_is_the_function_and_its_gradients():
    """Outside any checkpoint too: the output, the input's gradient and each parameter's (one unused) as one call."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    W = torch.randn(8, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    unused = torch.randn(3, dtype=torch.float64, generator=gen, requires_grad=True)
    grad = torch.randn(37, 5, dtype=torch.float64, generator=gen)
    function = lambda t: torch.tanh(t @ W) * t[:, :5]
    whole = function(x)
    expected = torch.autograd.grad(whole, (x, W), grad)
    tiled = in_tiles(function, x, token_tiles(37, 16), 5, [W, unused])
    assert torch.equal(tiled, whole)  # row by row: the same operations on each row
    dx, dW, dunused = torch.autograd.grad(tiled, (x, W, unused), grad, allow_unused=True)
    assert torch.equal(dx, expected[0]) and dunused is None
    torch.testing.assert_close(dW, expected[1], rtol=1e-12, atol=1e-12)  # summed tile by tile: another order


def plain_tiles(self, x, recompute_tiles=False):
    """The MLP's tiles without tiles.py: inside a checkpointed layer its recompute saves every tile's activations."""
    flat = x.reshape(-1, x.shape[-1])
    return torch.cat([self.untiled(t) for t in flat.split(token_tiles(flat.shape[0], self.tile_tokens))]).view(
        *x.shape[:-1], -1)


kernels = pytest.param("triton", marks=pytest.mark.skipif(not launch.INTERPRET, reason="the kernels on CPU tensors: "
                                                                               "TRITON_INTERPRET=1"))


@pytest.mark.parametrize("backend", ["torch", kernels])
def test_checkpointed_tiles_give_the_plain_tiles_gradients_and_run_each_forward_twice(monkeypatch, backend):
    """Two tiles of 24 and 16 tokens a layer, dropout 0.1: bit for bit (a sum of two tiles' gradients is the same in
    either order), the dropout draws replayed in the backward."""
    calls = []
    real_op = phi3.lora_layers.lora_linear
    monkeypatch.setattr(phi3.lora_layers, "lora_linear", lambda *a, **k: real_op(*a, **k, backend=backend))
    real_gemm = lora_kernels._gemm
    monkeypatch.setattr(lora_kernels, "_gemm", lambda site, *a: calls.append((site, a[0].shape[0], a[1].shape[1])) or
                        real_gemm(site, *a))
    monkeypatch.setattr(MLP, "tile_tokens", 24)
    model = lora_model(torch.device("cpu"), torch.float32, layers=2, hidden=64, dropout=0.1)
    model.recompute = Recompute()
    intermediate = model.config.intermediate_size
    batches = [torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(7))]
    tiled = gradients(model, batches, None)
    if backend == "triton":  # gate_up's products: two tiles a layer, in the forward and again in the backward
        gate_up = [rows for site, rows, width in calls if site == "fwd" and width == 2 * intermediate]
        assert sorted(gate_up) == [16] * 4 + [24] * 4, gate_up
    monkeypatch.setattr(MLP, "forward", plain_tiles)
    plain = gradients(model, batches, None)
    assert tiled.keys() == plain.keys() and len(plain) == 2 * 4 * 2
    for name in plain:
        assert torch.equal(tiled[name], plain[name]), name
