"""Without a GPU, Triton kernels run in its interpreter; the variable must be set before triton is imported.

Tests keep no kernel choices on disk between runs (phi3/kernel_tuning.py's cache): each GPU test run times its own,
and nothing is written to the user's ~/.cache. tests/test_kernel_tuning.py points the cache at a temporary folder."""

import os
import shutil
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["PHI3_KERNEL_CACHE"] = "off"


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
