"""One token through a 4-bit linear (kernels/nf4_gemv.py, decoding's matrix-vector kernel) against float64.

The checks are test_qlora_kernel's (y, dx, dA, dB against lora_linear_reference on W rounded to the dtype and in
fp64; DESIGN.md's rule), at one token, where the forward takes the matrix-vector kernel: in_features multiples of 64
(whole blocks per row) below, at and above one BLOCK_K step, ranks 0 (nf4_linear), 1 and 16, strided input.
CPU: under TRITON_INTERPRET=1, fp32 and fp16. GPU (`pytest -m cuda`): bf16 at Phi-3-mini, Phi-3-medium and Phi-4
shapes, and every config of the kernel. K split among programs (each row block's last split adds the partials)
and not split, both.
"""
import dataclasses

import pytest
import test_qlora_kernel
import torch

from conftest import cuda, needs_cuda, needs_triton
from phi3.kernels import choices, launch, qlora_linear
from test_qlora_kernel import _check, _check_nf4_linear

pytestmark = pytest.mark.usefixtures("poison_outputs")  # every kernel-written buffer starts as NaN


@pytest.fixture
def launched(monkeypatch):
    """The names of the kernels launched (and grids: `launched.grids`)."""
    names, real_run = Launched(), launch.run
    monkeypatch.setattr(launch, "run", lambda fn, grid, args, meta: names.note(fn.__name__, grid) or
                        real_run(fn, grid, args, meta))
    return names


class Launched(list):
    def __init__(self):
        super().__init__()
        self.grids = {}  # kernel name -> its last grid

    def note(self, name, grid):
        self.append(name)
        self.grids[name] = grid


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("k,r", [(64, 1), (192, 16), (320, 4)])
@pytest.mark.parametrize("split", [True, False], ids=["split-k", "whole-k"])
def test_one_token(launched, monkeypatch, dtype, k, r, split):
    """One step of 128 columns (two 64-blocks): K of 1, 3 and 5 blocks, in as many splits as steps (1, 2, 3) or in
    one."""
    monkeypatch.setattr(qlora_linear, "GEMV_PROGRAMS_PER_SM", 64 if split else 0)
    _check((1, 1, k), 37, r, dtype, scale=1.5, seed=k)
    assert launched.grids["_nf4_gemv_kernel"] == (3, -(-k // 128) if split else 1)


@needs_triton
def test_one_token_strided_and_without_lora(launched):
    _check((1, 128), 45, 8, torch.float32, scale=0.5, noncontig=True, seed=2)
    _check_nf4_linear((1, 1, 256), 29, torch.float16)
    assert launched.count("_nf4_gemv_kernel") == 2


@needs_triton
def test_codes_off_a_word_boundary_take_the_gemm(launched, monkeypatch):
    """Packed codes viewed from an odd byte of their storage (as a view into a checkpoint's bytes may be) cannot
    be read as int32 words: the GEMM computes that token, still right."""
    def shifted(*args, **kwargs):
        w = real_weight(*args, **kwargs)
        storage = torch.empty(w.packed.numel() + 1, dtype=torch.uint8, device=w.packed.device)
        storage[1:] = w.packed
        return dataclasses.replace(w, packed=storage[1:])

    real_weight = test_qlora_kernel._nf4_weight
    monkeypatch.setattr(test_qlora_kernel, "_nf4_weight", shifted)
    _check_nf4_linear((1, 1, 128), 29, torch.float32)
    assert launched.count("_nf4_gemm_kernel") == 2 and "_nf4_gemv_kernel" not in launched  # forward and dx


@needs_triton
def test_other_widths_and_token_counts_take_the_gemm(launched):
    _check((1, 1, 45), 37, 4, torch.float32)  # a block straddles rows: the GEMM's per-element tile
    _check((1, 2, 64), 37, 4, torch.float32)
    assert "_nf4_gemv_kernel" not in launched


@cuda
@needs_cuda
@pytest.mark.parametrize("k,n", [(3072, 9216), (3072, 3072), (8192, 3072), (5120, 35840), (17920, 5120)])
@pytest.mark.parametrize("r", [0, 16, 256])
def test_cuda_one_token_bf16(launched, k, n, r):
    if r:
        _check((1, 1, k), n, r, torch.bfloat16, scale=2.0, seed=r)
    else:
        _check_nf4_linear((1, 1, k), n, torch.bfloat16)
    assert "_nf4_gemv_kernel" in launched


@cuda
@needs_cuda
@pytest.mark.parametrize("option", list(choices.CONFIGS["nf4-gemv"]))
def test_cuda_every_config(monkeypatch, forced_config_runs, option):
    real_config = choices.config
    monkeypatch.setattr(choices, "config", lambda site, kernel, *a: choices.CONFIGS[kernel][option]
                        if kernel == "nf4-gemv" else real_config(site, kernel, *a))
    _check((1, 1, 3072), 9216, 16, torch.bfloat16, scale=2.0)
