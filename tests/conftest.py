"""Without a GPU, Triton kernels run in its interpreter; the variable must be set before triton is imported.

The kernel tests (test_lora_kernel.py, test_rope.py, test_fused_ops.py) share the markers below and the
poison_outputs fixture:
    from conftest import CUDA, DEV, cuda, needs_cuda, needs_triton
"""

import os
import shutil
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from phi3.kernels import launch  # noqa: E402  (after the variable above)

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
needs_triton = pytest.mark.skipif(not CUDA and not launch.INTERPRET,
                                  reason="no CUDA, and triton was imported before TRITON_INTERPRET=1 was set")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs an NVIDIA GPU (run `pytest -m cuda` on the device machine)")
cuda = pytest.mark.cuda


@pytest.fixture
def poison_outputs(monkeypatch):
    """Every buffer a kernel writes starts as NaN: an element it leaves unwritten fails the tests' isfinite checks."""
    monkeypatch.setattr(launch, "POISON_OUTPUTS", True)


@pytest.fixture
def forced_config_runs(monkeypatch):
    """A config forced on a kernel runs as itself: one too large for this GPU's shared memory would give way to
    another (kernels/choices.py's launch_with) and remember it for the key, passing its own test and deciding the
    next one's. Fresh fallbacks for the test; none may be taken."""
    from phi3.kernels import choices
    monkeypatch.setattr(choices, "_fits", {})
    yield
    assert not choices._fits, f"forced config does not fit this GPU; it ran {list(choices._fits.values())}"


REPO = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A random tiny Phi-3 (GQA) checkpoint written by transformers, with the real tokenizer files: train.py's --model
    in tests/test_train.py and tests/test_fsdp.py."""
    from tiny import save_hf
    folder = tmp_path_factory.mktemp("base")
    save_hf("gqa", folder, seed=3)
    for f in (REPO / "assets" / "tokenizer").iterdir():
        shutil.copy(f, folder / f.name)
    return folder


@pytest.fixture(scope="module")
def small_chat(tmp_path_factory):
    """The first 48 lines of examples/chat.jsonl: a short train.py run's data."""
    path = tmp_path_factory.mktemp("data") / "chat.jsonl"
    path.write_text("".join((REPO / "examples" / "chat.jsonl").read_text().splitlines(keepends=True)[:48]))
    return path
