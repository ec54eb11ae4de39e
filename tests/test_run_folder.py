"""Do no harm (phi3/run_folder.py, train.py): outputs never land on inputs or other runs, one process owns a run
folder, a machine failure ends in one line and a folder that can be used, and a finished adapter merges without
training."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from phi3 import load_model, load_tokenizer, save_model
from phi3.checkpoint import EXPORT_MARKER, CheckpointError
from phi3.lora import load_adapter, merge_lora
from phi3.run_folder import LOCK_FILE, RunFolderError, RunFolderLock
from phi3.run_state import list_checkpoints

REPO = Path(__file__).parent.parent


def run(*args) -> int:
    return train.main([str(a) for a in args])


def tree(folder: Path) -> list:
    """Every file and folder under `folder` with its size and modification time: whether anything changed."""
    return sorted((str(p.relative_to(folder)), p.stat().st_mtime_ns, p.stat().st_size if p.is_file() else 0)
                  for p in folder.rglob("*"))


def last_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err
    return err[-1]


@pytest.fixture(scope="module")
def done(base, small_chat, tmp_path_factory):
    """A finished 4-step LoRA run with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("done") / "run"
    assert run("--data", small_chat, "--model", base, "--out", out, "--max-steps", 4, "--save-every", 2,
               "--eval-fraction", 0, "--rank", 4) == 0
    return out


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    return copy


# ---- outputs against inputs and other runs ------------------------------------------------------------------

OVERLAPS = [  # (flags that place an output on what the run reads or keeps, the words of the refusal)
    (lambda t, b, d: ["--out", t / "o", "--export-merged", t / "o"], "--export-merged"),
    (lambda t, b, d: ["--out", t / "o" / "run", "--export-merged", t / "o"], "holds --out"),
    (lambda t, b, d: ["--out", t / "o", "--export-merged", t / "o" / "checkpoint-2"], "is inside --out"),
    (lambda t, b, d: ["--out", t / "o", "--export-merged", b], "is --model"),
    (lambda t, b, d: ["--out", t / "o", "--export-merged", b / "merged"], "is inside --model"),
    (lambda t, b, d: ["--out", b], "--out"),
    (lambda t, b, d: ["--out", b / "run"], "is inside --model"),
    (lambda t, b, d: ["--out", d.parent], "holds --data"),
    (lambda t, b, d: ["--out", t / "o", "--eval-data", t / "o" / "eval.jsonl"], "holds --eval-data"),
]


@pytest.mark.parametrize("flags,words", OVERLAPS)
def test_an_output_on_an_input_is_refused_before_anything_is_written(base, small_chat, tmp_path, capsys, flags, words):
    data = tmp_path / "data" / "chat.jsonl"
    data.parent.mkdir()
    shutil.copy(small_chat, data)
    model = tmp_path / "model"
    shutil.copytree(base, model)
    before = tree(tmp_path)
    assert run("--data", data, "--model", model, "--max-steps", 2, *flags(tmp_path, model, data)) == 2
    message = last_error(capsys)
    assert words in message, message
    assert tree(tmp_path) == before


def test_a_link_to_an_input_is_the_input(base, small_chat, tmp_path, capsys):
    (tmp_path / "alias").symlink_to(base)
    assert run("--data", small_chat, "--model", base, "--out", tmp_path / "o", "--export-merged", tmp_path / "alias") == 2
    assert "is --model" in last_error(capsys)


def test_outputs_inside_another_run_are_refused(done, small_chat, base, tmp_path, capsys):
    run_dir = copy_of(done, tmp_path)
    before = tree(run_dir)
    for flags in (["--out", run_dir / "sub"], ["--out", tmp_path / "o", "--export-merged", run_dir / "merged"],
                  ["--out", run_dir / "checkpoint-2" / "x"]):
        assert run("--data", small_chat, "--model", base, *flags) == 2
        assert "inside the run folder" in last_error(capsys)
    assert tree(run_dir) == before


def test_resume_into_a_folder_holding_another_run_is_refused(done, tmp_path, capsys):
    a, b = copy_of(done, tmp_path), tmp_path / "b"
    shutil.copytree(done, b)
    before = tree(b)
    assert run("--resume", a / "checkpoint-2", "--out", b) == 2
    assert "holds another run" in last_error(capsys)
    assert tree(b) == before


def test_a_resumed_run_never_takes_its_export_folder_from_the_run_folder(done, tmp_path, capsys):
    run_dir = copy_of(done, tmp_path)
    target = tmp_path / "victim"
    target.mkdir()
    (target / "config.json").write_text("{}")  # looks like a model folder: the old rule replaced it
    for saved in run_dir.rglob("train_config.json"):
        cfg = json.loads(saved.read_text())
        cfg["export_merged"] = str(target)
        saved.write_text(json.dumps(cfg))
    assert run("--resume", run_dir, "--max-steps", 6) == 0
    assert sorted(p.name for p in target.iterdir()) == ["config.json"]
    assert not (tmp_path / "elsewhere").exists()


def test_export_replaces_only_an_earlier_export(done, tmp_path, capsys):
    run_dir = copy_of(done, tmp_path)
    model_like = tmp_path / "downloaded"
    model_like.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):  # a model folder this program did not write
        (model_like / name).write_text("x")
    assert run("--resume", run_dir, "--export-merged", model_like) == 2
    assert "did not write" in last_error(capsys)
    assert all((model_like / n).read_text() == "x" for n in ("config.json", "model.safetensors", "tokenizer.json"))
    merged = tmp_path / "merged"
    assert run("--resume", run_dir, "--export-merged", merged) == 0
    first = (merged / "model.safetensors").stat().st_ino
    assert run("--resume", run_dir, "--export-merged", merged) == 0  # an earlier export: replaced
    assert (merged / "model.safetensors").stat().st_ino != first


def test_a_finished_adapter_merges_without_training(done, base, tmp_path, capsys):
    """`--resume FINISHED --export-merged DIR`: no step runs; DIR is a complete model folder (tokenizer and
    generation config included) whose logits are those of the base with the adapter."""
    run_dir = copy_of(done, tmp_path)
    before = tree(run_dir)
    merged = tmp_path / "merged"
    assert run("--resume", run_dir, "--export-merged", merged) == 0
    assert "merged model written" in capsys.readouterr().err
    assert tree(run_dir) == before
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", EXPORT_MARKER):
        assert (merged / name).is_file(), name
    reference = load_adapter(load_model(base), run_dir)
    ids = torch.tensor([load_tokenizer(merged).encode("A short test sentence.")])
    with torch.no_grad():
        torch.testing.assert_close(load_model(merged)(ids), reference(ids), rtol=1e-4, atol=1e-4)
    from sample import load_for_chat  # the README's merged folder chats
    load_for_chat(merged, None, "cpu")


def test_save_model_never_replaces_a_folder_of_other_files(base, tmp_path):
    model = load_model(base)
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="did not write"):
        save_model(model, folder, tokenizer_from=base)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        save_model(model, tmp_path / "new", tokenizer_from=tmp_path)
    assert not (tmp_path / "new").exists()
    saved = save_model(model, tmp_path / "new", tokenizer_from=base)
    assert (saved / "tokenizer.json").is_file() and load_tokenizer(saved).stop_ids == load_tokenizer(base).stop_ids
    save_model(model, saved, tokenizer_from=base)  # its own earlier save: replaced


# ---- one process per run folder -------------------------------------------------------------------------------

def train_cmd(base, data, out, *more) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), "--data", str(data), "--model", str(base), "--out", str(out),
            "--eval-fraction", "0", *map(str, more)]


def test_a_held_run_folder_is_refused_and_a_killed_owner_leaves_no_lock(base, small_chat, tmp_path):
    out = tmp_path / "r"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
                               "from phi3.run_folder import RunFolderLock; "
                               "lock = RunFolderLock(__import__('pathlib').Path(sys.argv[2])).__enter__(); "
                               "print('held', flush=True); time.sleep(600)", str(REPO), str(out)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = subprocess.run(train_cmd(base, small_chat, out, "--max-steps", 2), cwd=REPO, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 2 and f"in use by another train.py (process {holder.pid})" in proc.stderr, proc.stderr
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    proc = subprocess.run(train_cmd(base, small_chat, out, "--max-steps", 2), cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr  # the kernel dropped the killed process's lock
    assert not (out / LOCK_FILE).exists() and (out / "adapter_model.safetensors").is_file()


def test_two_runs_on_one_folder_one_trains_the_other_is_refused(base, small_chat, tmp_path):
    out = tmp_path / "r"
    procs = [subprocess.Popen(train_cmd(base, small_chat, out, "--max-steps", 3, "--seed", seed, "--log-every", 1),
                              cwd=REPO, stderr=subprocess.PIPE, text=True) for seed in (1, 2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "Traceback" not in loser and ("in use by another" in loser or "holds another run" in loser), loser
    winner_seed = json.loads((out / "train_config.json").read_text())["seed"]
    assert json.loads((out / "checkpoint-3" / "train_config.json").read_text())["seed"] == winner_seed
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_two_resumes_of_one_run_one_continues(done, tmp_path):
    run_dir = copy_of(done, tmp_path)
    cmd = [sys.executable, str(REPO / "train.py"), "--resume", str(run_dir), "--max-steps", "8", "--log-every", "1"]
    procs = [subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes in ([0, 0], [0, 2]), results  # the second finds the run finished, or the folder in use
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == sorted(set(steps)) and steps[-1] == 8, steps


def test_the_lock_folder_is_removed_when_the_run_fails_before_training(small_chat, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    assert run("--data", bad, "--out", tmp_path / "a" / "b") == 2
    assert not (tmp_path / "a").exists()
    with RunFolderLock(tmp_path / "c"):
        with pytest.raises(RunFolderError, match="in use"):
            RunFolderLock(tmp_path / "c").__enter__()
    assert not (tmp_path / "c").exists()


# ---- failures of the machine ---------------------------------------------------------------------------------

def limit_file_size(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_failed_save_is_one_line_and_the_folder_stays_usable(base, small_chat, tmp_path):
    """The disk fills during the first checkpoint (a file size limit: writes fail as on a full disk): one line,
    exit 2, no half-written checkpoint; the folder of a run that never saved takes a new run, and --resume says why
    it cannot continue it."""
    out = tmp_path / "r"
    proc = subprocess.run(train_cmd(base, small_chat, out, "--max-steps", 4, "--save-every", 2), cwd=REPO,
                          capture_output=True, text=True, timeout=300, preexec_fn=limit_file_size(16_000))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "File too large" in proc.stderr
    assert not list_checkpoints(out) and not [p for p in out.iterdir() if ".tmp-" in p.name]
    resumed = subprocess.run([sys.executable, str(REPO / "train.py"), "--resume", str(out)], cwd=REPO,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 2 and "never saved" in resumed.stderr.splitlines()[-1], resumed.stderr
    again = subprocess.run(train_cmd(base, small_chat, out, "--max-steps", 4), cwd=REPO, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # the failed run's lines are gone


def test_training_with_stderr_closed_completes(base, small_chat, tmp_path):
    out = tmp_path / "r"
    proc = subprocess.run(train_cmd(base, small_chat, out, "--max-steps", 3, "--log-every", 1), cwd=REPO,
                          stdout=subprocess.PIPE, timeout=300, preexec_fn=lambda: os.close(2))
    assert proc.returncode == 0
    assert (out / "adapter_model.safetensors").is_file() and (out / "loss.png").is_file()


def test_training_with_a_failing_stderr_completes(base, small_chat, tmp_path):
    out = tmp_path / "r"
    with open("/dev/full", "w") as full:  # every write fails: No space left on device
        proc = subprocess.run(train_cmd(base, small_chat, out, "--max-steps", 3, "--log-every", 1), cwd=REPO,
                              stderr=full, timeout=300)
    assert proc.returncode == 0 and (out / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("name", ["metrics.jsonl", "checkpoint-4/train_config.json", "checkpoint-4/optimizer.safetensors"])
def test_a_fifo_in_a_run_folder_is_refused_not_waited_on(done, tmp_path, name):
    run_dir = copy_of(done, tmp_path)
    (run_dir / name).unlink()
    os.mkfifo(run_dir / name)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--resume", str(run_dir), "--max-steps", "6"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "not a regular file" in proc.stderr.splitlines()[-1], proc.stderr
    assert time.monotonic() - started < 120


# ---- files from others: metrics -------------------------------------------------------------------------------

def test_a_strangers_metrics_file_is_data(done, tmp_path):
    pytest.importorskip("matplotlib", reason="requirements-test.txt installs matplotlib for loss.png")
    run_dir = copy_of(done, tmp_path)
    with open(run_dir / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 1, "loss": {"a": 1}}\n\xff\xfe garbage\n{"step": 2, "loss": NaN}\n[' + b"[" * 10_000 + b"\n"
                b'{"step": "3", "loss": 1.0}\n{"step": 1e400, "eval_loss": 1}\n')
    (run_dir / "loss.png").unlink()
    assert run("--resume", run_dir, "--max-steps", 6) == 0
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ctrl_c_writes_the_loss_plot(base, small_chat, tmp_path):
    pytest.importorskip("matplotlib", reason="requirements-test.txt installs matplotlib for loss.png")
    out = tmp_path / "r"
    proc = subprocess.Popen(train_cmd(base, small_chat, out, "--max-steps", 100000, "--save-every", 0,
                                      "--log-every", 1), cwd=REPO, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().count("\n") >= 2:
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
