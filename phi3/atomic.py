"""Writes that are all or nothing: a file or folder is built under a temporary name, then renamed into place.

A crash or kill at any moment leaves either the previous version or the new one, never half of either.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file


# .NAME.tmp-1a2b3c4d (being written) and .NAME.old-1a2b3c4d (the version being replaced)
TEMPORARY_RE = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old)-[0-9a-f]{8}")


def _temporary_name(final: Path, kind: str) -> Path:
    return final.with_name(f".{final.name}.{kind}-{uuid.uuid4().hex[:8]}")


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """with atomic_file(p) as tmp: write tmp  ->  tmp renamed over p (removed if the body fails)."""
    final = Path(path)
    tmp = _temporary_name(final, "tmp")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """with atomic_dir(d) as tmp: fill folder tmp  ->  tmp takes d's place; an older d is swapped out, then deleted."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(final, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if final.exists():
            old = _temporary_name(final, "old")
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> None:
    """save_file, atomically, with its failures as OSError: safetensors reports a full disk as its own error
    type ("... No space left on device (os error 28)"), which callers would otherwise meet as a traceback."""
    with atomic_file(path) as tmp:
        try:
            save_file(tensors, tmp, metadata=metadata)
        except SafetensorError as e:
            code = re.search(r"os error (\d+)", str(e))
            number = int(code.group(1)) if code else errno.EIO
            raise OSError(number, os.strerror(number) if code else str(e).splitlines()[0], str(path)) from None
