"""Without a GPU, Triton kernels run in its interpreter; the variable must be set before triton is imported.

Tests keep no kernel choices on disk between runs (phi3/kernel_tuning.py's cache): each GPU test run times its own,
and nothing is written to the user's ~/.cache. tests/test_kernel_tuning.py points the cache at a temporary folder."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["PHI3_KERNEL_CACHE"] = "off"
