"""sample.py end to end on the embedded tiny model: reply on stdout only, stats on stderr, clear errors."""

import importlib.util
import io
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).parent.parent
sys.path.insert(0, str(REPO))
import sample as cli  # noqa: E402  (in this process; sample() below runs it as a process)


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


# ---- every bad flag, input and file is one line `error: ...`, exit code 2 -------------------------------------

needs_model = pytest.mark.skipif(not (REPO / "models" / "tiny-phi3" / "model.safetensors").exists(),
                                 reason="embedded model missing")


def run_main(monkeypatch, capsys, *argv, stdin: bytes | None = None):
    """sample.main in this process (fast: no interpreter + torch start per case): (exit code, stdout, stderr)."""
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:  # argparse's errors exit from inside parse_args
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_error(code, err, *phrases):
    """Exit code 2, no traceback, and the error is the last line of stderr and the only one saying error."""
    lines = err.strip().splitlines()
    assert code == 2 and "Traceback" not in err, err
    assert [line for line in lines if "error" in line.lower()] == lines[-1:] and lines[-1].startswith("error: "), err
    for phrase in phrases:
        assert phrase in lines[-1], err


@pytest.mark.parametrize("argv,phrase", [
    (["--max-new-tokens", "-1"], "--max-new-tokens"), (["--max-new-tokens", "1e3"], "--max-new-tokens"),
    (["--max-new-tokens", "9" * 5000], "--max-new-tokens"),  # more digits than int() takes
    (["--temperature", "nan"], "--temperature"), (["--temperature", "inf"], "--temperature"),
    (["--temperature", "-inf"], "--temperature"), (["--temperature", "1e999"], "--temperature"),
    (["--temperature", "-0.5"], "--temperature"), (["--temperature", "warm"], "--temperature"),
    (["--top-p", "0"], "--top-p"), (["--top-p", "1.5"], "--top-p"), (["--top-p", "-0.1"], "--top-p"),
    (["--top-p", "nan"], "--top-p"), (["--top-p", "inf"], "--top-p"),
    (["--top-k", "-1"], "--top-k"), (["--top-k", "2.5"], "--top-k"),
    (["--seed", "-1"], "--seed"), (["--seed", str(2**64)], "--seed"),
    (["--device", "bogus"], "--device"), (["--device", ""], "--device"), (["--device", "meta"], "--device"),
    (["--device", "cuda:99"], "--device"), (["--dtype", "fp8"], "--dtype"), (["--no-such-flag"], "--no-such-flag"),
    (["--prompt"], "--prompt"),
])
def test_bad_flag_is_one_line(monkeypatch, capsys, argv, phrase):
    code, out, err = run_main(monkeypatch, capsys, *argv)
    assert_one_error(code, err, phrase)
    assert len(err.strip().splitlines()) == 1 and out == ""  # refused before anything is loaded


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_a_gpu_is_one_line(monkeypatch, capsys):
    assert_one_error(*run_main(monkeypatch, capsys, "--device", "cuda", "--prompt", "hi")[::2], "no CUDA GPU")


@pytest.mark.parametrize("argv,phrase", [
    (["--prompt", "a\udcffb"], "--prompt: character 1"),  # how a shell's non-UTF-8 bytes reach sys.argv
    (["--prompt", "hi", "--system", "\ud800"], "--system"),
    (["--prompt", ""], "--prompt is empty"), (["--prompt", " \n\t"], "--prompt is empty"),
])
def test_bad_prompt_text_is_one_line(monkeypatch, capsys, argv, phrase):
    code, out, err = run_main(monkeypatch, capsys, *argv, "--adapter", "none")
    assert_one_error(code, err, phrase)


@needs_model
@pytest.mark.parametrize("stdin,phrase", [
    (b"", "no prompt on stdin"), (b" \n\t\r\n", "no prompt on stdin"), (b"\xef\xbb\xbf\n", "no prompt on stdin"),
    (b"Define \"water\". \xff", "stdin: byte 16 (0xff) is not UTF-8"), (b"\xef\xbb\xbfab\xff", "byte 5 (0xff)"),
    ("Define".encode("utf-16"), "is not UTF-8"),
    (b"\xed\xa0\x80", "is not UTF-8"),  # a surrogate spelled in UTF-8 is not UTF-8 either
    (b"word " * 60_000, "stdin: more than"),  # refused after reading what the context can hold, not tokenized
    (b"word " * 5000, "the prompt is"),  # fits the byte bound, not the 4096-token context
])
def test_bad_stdin_is_one_line(monkeypatch, capsys, stdin, phrase):
    code, out, err = run_main(monkeypatch, capsys, "--adapter", "none", stdin=stdin)
    assert_one_error(code, err, phrase)
    assert out == ""


@needs_model
def test_closed_stdin_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", None)  # what Python sets for `python sample.py <&-`
    assert_one_error(*run_main(monkeypatch, capsys, "--adapter", "none")[::2], "stdin is closed")


@needs_model
def test_prompt_longer_than_the_context_gives_the_token_counts(monkeypatch, capsys):
    code, out, err = run_main(monkeypatch, capsys, "--adapter", "none", "--prompt", "word " * 5000)
    assert_one_error(code, err, "the prompt is", "tokens", "context is 4096", "shorten it")
    n = int(err.split("the prompt is ")[1].split()[0])
    assert n > 4096 and out == ""


def write_adapter(folder: Path, config, weights: bytes | None = b"") -> Path:
    """An adapter folder: config as JSON (a dict), text or bytes (written as given), None for no file."""
    folder.mkdir()
    if config is not None:
        text = config if isinstance(config, (str, bytes)) else json.dumps(config)
        (folder / "adapter_config.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    if weights is not None:
        (folder / "adapter_model.safetensors").write_bytes(weights)
    return folder


GOOD = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["qkv_proj"],
        "base_model_name_or_path": str(cli.EMBEDDED_MODEL)}  # (an adapter naming no base needs --model)


@needs_model
@pytest.mark.parametrize("config,weights,phrase", [
    (None, b"", "adapter_config.json"),  # missing
    ("{not json", b"", "adapter_config.json"), ("[1, 2]", b"", "adapter_config.json"),
    ("[" * 100_000, b"", "adapter_config.json"), (b"\xff\xfe{}", b"", "adapter_config.json"),
    (dict(GOOD, r="8"), b"", "'r'"), (dict(GOOD, lora_alpha=float("nan")), b"", "lora_alpha"),
    (dict(GOOD, base_model_name_or_path="microsoft/Phi-3-mini-4k-instruct"), b"", "not a local folder"),
    (dict(GOOD, base_model_name_or_path=5), b"", "base_model_name_or_path"),
    (GOOD, None, "adapter_model.safetensors"), (GOOD, b"\x00" * 3, "adapter_model.safetensors"),
    (GOOD, b"\xff" * 64, "adapter_model.safetensors"),
])
def test_bad_adapter_is_one_line(monkeypatch, capsys, tmp_path, config, weights, phrase):
    adapter = write_adapter(tmp_path / "adapter", config, weights)
    code, out, err = run_main(monkeypatch, capsys, "--adapter", adapter, "--prompt", "hi")
    assert_one_error(code, err, phrase)


@needs_model
def test_adapter_config_that_is_a_folder_is_one_line(monkeypatch, capsys, tmp_path):
    adapter = write_adapter(tmp_path / "adapter", None)
    (adapter / "adapter_config.json").mkdir()
    assert_one_error(*run_main(monkeypatch, capsys, "--adapter", adapter, "--prompt", "hi")[::2], "adapter_config.json")


@needs_model
@pytest.mark.parametrize("broken,phrase", [
    ("model.safetensors", "model.safetensors"), ("config.json", "config.json"), ("tokenizer.json", "tokenizer.json"),
    ("tokenizer_config.json", "tokenizer_config.json"), ("generation_config.json", "generation_config.json"),
])
def test_bad_model_folder_is_one_line(monkeypatch, capsys, tmp_path, broken, phrase):
    """The embedded model with one file replaced by garbage (files from strangers: phi3/ checks them)."""
    for f in (REPO / "models" / "tiny-phi3").iterdir():
        (tmp_path / f.name).symlink_to(f)
    (tmp_path / broken).unlink()
    (tmp_path / broken).write_bytes(b"\xff\x00[[[garbage")
    code, out, err = run_main(monkeypatch, capsys, "--model", tmp_path, "--adapter", "none", "--prompt", "hi")
    assert_one_error(code, err, phrase)


def test_model_that_is_a_file_is_one_line(monkeypatch, capsys, tmp_path):
    (tmp_path / "model").write_text("hi")
    code, out, err = run_main(monkeypatch, capsys, "--model", tmp_path / "model", "--adapter", "none", "--prompt", "hi")
    assert_one_error(code, err, "model")


def test_unreadable_file_is_one_line_naming_it(monkeypatch, capsys):
    # root reads files whatever their mode, so the OSError a permission problem raises is made directly
    def unreadable(path):
        raise PermissionError(13, "Permission denied", "/models/x/tokenizer.json")
    monkeypatch.setattr(cli, "load_tokenizer", unreadable)
    code, out, err = run_main(monkeypatch, capsys, "--prompt", "hi", "--adapter", "none")
    assert_one_error(code, err, "/models/x/tokenizer.json: Permission denied")


# ---- the context: prompt + reply never pass max_position_embeddings --------------------------------------------

@pytest.fixture
def small_context(tmp_path) -> Path:
    """The embedded model with a 64-token context (same weights: positions below 64 are unchanged)."""
    folder = tmp_path / "ctx64"
    folder.mkdir()
    for f in (REPO / "models" / "tiny-phi3").iterdir():
        (folder / f.name).symlink_to(f)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").unlink()
    config.update(max_position_embeddings=64, original_max_position_embeddings=64)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@needs_model
def test_reply_stops_at_the_context_and_says_so(capsys, small_context):
    model, tokenizer = cli.load_for_chat(small_context, None, "cpu")
    tokenizer.stop_ids = ()  # no stop id: the reply runs into the context, whatever the model says
    args = cli.parse_args(["--max-new-tokens", "100"])
    prompt, _ = tokenizer.render([{"role": "user", "content": "word " * 40}], add_generation_prompt=True)
    ids = cli.reply(model, tokenizer, prompt, args, torch.Generator())
    assert len(prompt) + len(ids) == 64
    assert "[reply cut at the model's 64-token context" in capsys.readouterr().err
    args = cli.parse_args(["--max-new-tokens", str(64 - len(prompt))])  # exactly fits: nothing to say
    cli.reply(model, tokenizer, prompt, args, torch.Generator())
    assert "cut" not in capsys.readouterr().err


@needs_model
def test_chat_drops_the_oldest_turns_but_keeps_the_system_message(monkeypatch, capsys, small_context):
    model, tokenizer = cli.load_for_chat(small_context, None, "cpu")
    args = cli.parse_args(["--max-new-tokens", "8"])  # room for the reply: 8 tokens
    system = {"role": "system", "content": "Be brief."}
    line = " ".join(["cat", "dog"] * 15)
    turn = [system, {"role": "user", "content": line}]

    def length(messages):
        return len(tokenizer.render(messages, add_generation_prompt=True)[0])
    # one turn fits with room for the reply; two never do, whatever the first reply was
    assert length(turn) + 8 <= 64 < length(turn + [{"role": "assistant", "content": ""}, turn[1]])
    lines = iter([line, "a\udcffb", "word " * 80, line])
    prompts = []

    def fake_input(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None
    real_generate = cli.generate

    def recording_generate(model, prompt_ids, *a, **k):
        prompts.append(len(prompt_ids))
        return real_generate(model, prompt_ids, *a, **k)
    monkeypatch.setattr("builtins.input", fake_input)
    monkeypatch.setattr(cli, "generate", recording_generate)
    messages = [system]
    assert cli.chat(model, tokenizer, messages, args, torch.Generator()) == 0
    err = capsys.readouterr().err
    assert "dropped its 1 oldest turn(s)" in err and "Traceback" not in err
    assert "error: that line: character 1 is '\\udcff'" in err  # reported, and the chat went on
    assert "error: that message is" in err and "context is 64" in err
    assert len(prompts) == 2 and all(n + 8 <= 64 for n in prompts)
    assert messages[0] == system and [m["role"] for m in messages[1:]] == ["user", "assistant"]


# ---- the real process: stdin closed, bytes on the command line, Ctrl-C, a closed pipe ------------------------

@needs_model
def test_closed_stdin_in_a_real_process(tmp_path):
    out = subprocess.run(["bash", "-c", 'exec "$0" "$@" <&-', sys.executable, str(REPO / "sample.py"), "--adapter",
                          "none"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert_one_error(out.returncode, out.stderr, "stdin is closed")


@needs_model
def test_bytes_that_are_not_utf8_in_a_real_process(tmp_path):
    argv = [sys.executable, str(REPO / "sample.py"), "--adapter", "none"]
    prompt = subprocess.run(argv + ["--prompt", b"caf\xe9"], cwd=tmp_path, capture_output=True, timeout=300)
    assert_one_error(prompt.returncode, prompt.stderr.decode(), "--prompt: character 3")
    piped = subprocess.run(argv, cwd=tmp_path, input=b"caf\xe9", capture_output=True, timeout=300)
    assert_one_error(piped.returncode, piped.stderr.decode(), "stdin: byte 3 (0xe9) is not UTF-8")


@needs_model
def test_ctrl_c_is_quiet_with_exit_code_130(tmp_path):
    proc = subprocess.Popen([sys.executable, str(REPO / "sample.py"), "--adapter", "none"], cwd=tmp_path,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr.readline().startswith("model ")  # loaded: now it waits for the prompt on stdin
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and out == "" and err.strip() == "", err


@needs_model
def test_reader_that_leaves_early_is_no_traceback(tmp_path):
    script = f'"{sys.executable}" "{REPO / "sample.py"}" --adapter none --prompt hi --max-new-tokens 200 | head -c 1'
    out = subprocess.run(["bash", "-o", "pipefail", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode in (0, 141) and "Traceback" not in out.stderr and "Exception" not in out.stderr, out.stderr


@pytest.fixture
def eval_chat():
    """examples/eval_chat.py as a module (it is a script, not in a package)."""
    spec = importlib.util.spec_from_file_location("eval_chat", REPO / "examples" / "eval_chat.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def question(*messages):
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in messages]})


@needs_model
@pytest.mark.parametrize("argv,lines,phrase", [
    (["--limit", "0"], None, "--limit"), (["--max-new-tokens", "-1"], None, "--max-new-tokens"),
    (["--show", "-1"], None, "--show"), (["--device", "bogus"], None, "--device"),
    (["--json", "{tmp}/no/such/folder/s.json"], None, "--json"),
    ([], [question(("user", "hi"), ("assistant", "x")), question(("user", 5), ("assistant", "x"))], "q.jsonl:2:"),
    ([], [question(("user", "hi"))], "q.jsonl:1:"), ([], ['{"messages": [["hi"], ["x"]]}'], "q.jsonl:1:"),
    ([], ["[" * 100_000], "q.jsonl:1:"), ([], ['{"messages": ' + "1" * 5000 + "}"], "q.jsonl:1:"),
    ([], [question(("user", "\ud800"), ("assistant", "x"))], "lone surrogate"),  # json.dumps escapes it
    ([], [question(("assistant", "x"), ("assistant", "y"))], "q.jsonl:1:"), ([], ["", " "], "no questions"),
    ([], [question(("user", "word " * 5000), ("assistant", "x"))], "context is 4096"),
    (["--data", "{tmp}"], None, "not a file"), (["--data", "{tmp}/missing.jsonl"], None, "not a file"),
    ([], [b"\xff\xfe{}"], "not UTF-8"),
])
def test_eval_script_refuses_bad_flags_and_files_in_one_line(capsys, tmp_path, eval_chat, argv, lines, phrase):
    if lines is not None:
        (tmp_path / "q.jsonl").write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
        argv = argv + ["--data", str(tmp_path / "q.jsonl")]
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    try:
        code = eval_chat.main(argv + ["--adapter", "none"])
    except SystemExit as e:
        code = e.code
    assert_one_error(code, capsys.readouterr().err, phrase)


def test_adapter_that_names_no_base_model_needs_model_flag(tmp_path, capsys):
    from phi3 import load_model
    from phi3.lora import LoRAConfig, add_lora, save_adapter
    model = load_model(cli.EMBEDDED_MODEL)
    add_lora(model, LoRAConfig(rank=2))
    save_adapter(model, tmp_path / "a")  # base_model=None
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["base_model_name_or_path"] is None
    assert cli.main(["--adapter", str(tmp_path / "a"), "--prompt", "hi", "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "names no base model" in err[-1] and "--model" in err[-1], err
