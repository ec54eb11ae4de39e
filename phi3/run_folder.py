"""Where train.py writes: one process owns a run folder at a time, a new run never takes another run's folder,
and no output lands on an input.

    check_places(out, {"--model": model, "--data": data}, export_merged=None)   # RunFolderError: one line
    with RunFolderLock(out):      # RunFolderError if another process holds it; created here, removed if left empty
        ...

A run folder holds train_config.json, metrics.jsonl, loss.png, the final adapter (or model) and checkpoint-STEP/
folders. A folder whose run never saved a step (stopped by an error before its first checkpoint) holds only a
config and metrics: it is not a run, and a new run may take it.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from phi3.run_state import STATE_FILE, list_checkpoints

LOCK_FILE = ".train.lock"
FINAL_FILES = ("adapter_config.json", "adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")


class RunFolderError(ValueError):
    """An output folder that would harm a run or an input; the message names both and what to do."""


def saved_anything(folder: Path) -> bool:
    """Whether `folder` holds a run that saved a step: a complete checkpoint, or a final adapter or model."""
    return bool(list_checkpoints(folder)) or any((folder / name).exists() for name in FINAL_FILES)


def check_fresh_run_folder(run_dir: Path) -> None:
    """A new run must not share its folder with another: --keep would delete that run's checkpoints and a later
    --resume would continue the wrong run."""
    if run_dir.is_dir() and saved_anything(run_dir):
        found = sorted(p.name for p in run_dir.iterdir() if p.name.startswith("checkpoint-") or p.name in FINAL_FILES)
        raise RunFolderError(f"--out {run_dir} holds another run ({', '.join(found[:3])}); continue it with "
                             f"--resume {run_dir}, or choose a new --out (or delete the folder)")


def _real(path) -> Path:
    return Path(os.path.expanduser(os.fspath(path))).resolve()  # links followed: two names of one folder meet


def _relation(inner: Path, outer: Path) -> str | None:
    if inner == outer:
        return "is"
    return "is inside" if outer in inner.parents else None


def _enclosing_run(folder: Path) -> Path | None:
    """The run folder (or checkpoint) that `folder` lies inside, if any."""
    for parent in folder.parents:
        if (parent / "train_config.json").is_file() or (parent / STATE_FILE).is_file():
            return parent
    return None


def check_places(out, reads: dict[str, object], export_merged=None, resumed_run=None) -> None:
    """Refuse, before any work, an output that is, holds or lies inside an input (reads: flag -> path, e.g. the
    model folder and the data files), the run folder and the merged export inside each other, and either inside
    another run. resumed_run: the run folder of --resume, which --out may be (that run continues there)."""
    writes = {"--out": _real(out)}
    if export_merged is not None:
        writes["--export-merged"] = _real(export_merged)
    sources = {flag: _real(path) for flag, path in reads.items() if path}
    if resumed_run is not None and _real(resumed_run) != writes["--out"]:
        sources["--resume"] = _real(resumed_run)
    if "--export-merged" in writes:
        sources["--out"] = writes["--out"]  # the run folder is kept: the export must not replace or hold it
    for flag, place in writes.items():
        for source_flag, source in sources.items():
            if source_flag == flag:
                continue
            relation = _relation(place, source) or ("holds" if _relation(source, place) else None)
            if relation:
                raise RunFolderError(f"{flag} {place} {relation} {source_flag} {source}: the output would land on what "
                                     f"the run reads or keeps; choose a {flag} folder apart from it")
        run = _enclosing_run(place)
        if run is not None and not (flag == "--out" and run == place):
            raise RunFolderError(f"{flag} {place} is inside the run folder {run}; choose a folder outside every run")


class RunFolderLock:
    """The run folder, owned by this process: an exclusive flock on RUN/.train.lock, which the kernel drops when
    the process ends however it ends (kill -9 too), so no lock outlives its run. The folder is created here if
    missing, and removed again on exit if the run wrote nothing into it (it failed before training)."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.fd, self.created = Path(run_dir), None, []

    def __enter__(self) -> "RunFolderLock":
        missing = [p for p in (self.run_dir, *self.run_dir.parents) if not p.exists()]
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.created = missing  # innermost first
        path = self.run_dir / LOCK_FILE
        while self.fd is None:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.read(fd, 32).decode(errors="replace").strip()
                os.close(fd)
                raise RunFolderError(f"--out {self.run_dir} is in use by another train.py (process {owner or '?'}); "
                                     "wait for it to end, or choose another --out") from None
            if os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False)):
                self.fd = fd  # (else the owner removed the file as we opened it: lock the new one)
            else:
                os.close(fd)
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())
        return self

    def __exit__(self, *exc) -> None:
        try:
            os.unlink(self.run_dir / LOCK_FILE)  # before the unlock: a process that opened this file sees it gone
        except FileNotFoundError:
            pass
        os.close(self.fd)
        for folder in self.created:
            try:
                folder.rmdir()  # only if empty: the run wrote nothing there
            except OSError:
                break
