"""sample.py end to end on the embedded tiny model: reply on stdout only, stats on stderr, clear errors."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parent.parent


def sample(*args, cwd, stdin=None):
    return subprocess.run([sys.executable, str(REPO / "sample.py"), *map(str, args)], cwd=cwd, input=stdin,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(not (REPO / "models" / "tiny-phi3" / "model.safetensors").exists(), reason="embedded model missing")
def test_prompt_reply_goes_to_stdout_and_stats_to_stderr(tmp_path):
    out = sample("--prompt", "What does the word \"house\" mean?", "--max-new-tokens", 12, "--adapter", "none",
                 cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() and "<|" not in out.stdout
    assert "tokens/s" in out.stderr and "tokens/s" not in out.stdout
    again = sample("--prompt", "What does the word \"house\" mean?", "--max-new-tokens", 12, "--adapter", "none",
                   cwd=tmp_path)
    assert again.stdout == out.stdout  # greedy is deterministic
    piped = sample("--max-new-tokens", 12, "--adapter", "none", cwd=tmp_path, stdin="What does the word \"house\" mean?")
    assert piped.stdout == out.stdout


@pytest.mark.skipif(not (REPO / "models" / "tiny-phi3" / "model.safetensors").exists(), reason="embedded model missing")
def test_sampling_is_seeded(tmp_path):
    args = ("--prompt", "Define \"water\".", "--max-new-tokens", 10, "--temperature", 1.0, "--top-k", 50,
            "--adapter", "none")
    a, b = sample(*args, "--seed", 1, cwd=tmp_path), sample(*args, "--seed", 1, cwd=tmp_path)
    assert a.returncode == 0 and a.stdout == b.stdout


def test_missing_model_is_one_clear_error(tmp_path):
    out = sample("--model", tmp_path / "nope", "--prompt", "hi", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("error: ") and "checkpoint folder not found" in out.stderr


@pytest.mark.skipif(not (REPO / "models" / "tiny-phi3" / "model.safetensors").exists(), reason="embedded model missing")
def test_adapter_from_a_training_run_is_applied(tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join((REPO / "examples" / "chat.jsonl").read_text().splitlines(keepends=True)[:16]))
    run = subprocess.run([sys.executable, str(REPO / "train.py"), "--data", str(data), "--out", str(tmp_path / "out"),
                          "--max-steps", "2", "--eval-fraction", "0"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    out = sample("--prompt", "Define \"water\".", "--max-new-tokens", 5, cwd=tmp_path)  # ./out is the default
    assert out.returncode == 0 and "+ adapter out" in out.stderr, out.stderr


@pytest.mark.skipif(not (REPO / "models" / "tiny-phi3" / "model.safetensors").exists(), reason="embedded model missing")
def test_eval_script_scores_and_reports_a_missing_adapter_cleanly(tmp_path):
    script = [sys.executable, str(REPO / "examples" / "eval_chat.py"), "--limit", "2", "--max-new-tokens", "8"]
    ok = subprocess.run(script + ["--adapter", "none"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0 and "2 questions, F1" in ok.stdout, ok.stderr
    bad = subprocess.run(script + ["--adapter", str(tmp_path / "nope")], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "adapter_config.json: not found" in bad.stderr
