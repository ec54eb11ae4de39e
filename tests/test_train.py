"""train.py on tiny models (CPU): learning, resume, atomic checkpoints, bad input, loss accounting, peft export."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sample
import train
from phi3 import load_model, load_tokenizer
from phi3.train_config import ADDED_LATER
from phi3.data import make_batches, pad_token_for, read_jsonl
from phi3.lora import LoRAConfig, add_lora, load_adapter, lora_modules, mark_only_lora_as_trainable
from phi3.model import Recompute
from phi3.run_state import find_checkpoint, list_checkpoints
from tiny import transformers_or_skip
from torchrun_kill import kill_a_worker_past_step

REPO = Path(__file__).parent.parent
CHAT = REPO / "examples" / "chat.jsonl"


def run(*args) -> int:
    return train.main([str(a) for a in args])


def metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_loss_goes_down(base, small_chat, tmp_path):
    assert run("--data", small_chat, "--model", base, "--out", tmp_path / "r", "--max-steps", 30, "--lr", 1e-2, "--targets", "qkv,o,gate_up,down,lm_head",
               "--eval-fraction", 0.2, "--log-every", 1, "--rank", 8) == 0
    rows = metrics(tmp_path / "r")
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    train_losses = [r["loss"] for r in rows if "loss" in r]
    assert evals[-1] < evals[0] - 0.5
    assert sum(train_losses[-5:]) / 5 < sum(train_losses[:5]) / 5 - 0.5
    for name in ("adapter_config.json", "adapter_model.safetensors", "train_config.json", "checkpoint-30"):
        assert (tmp_path / "r" / name).exists()


def test_resume_gives_the_same_adapter_as_a_straight_run(base, small_chat, tmp_path):
    common = ["--data", small_chat, "--model", base, "--max-steps", 20, "--lr", 1e-3, "--dropout", 0.1, "--batch-size", 2]
    assert run(*common, "--out", tmp_path / "straight", "--save-every", 10) == 0
    shutil.copytree(tmp_path / "straight" / "checkpoint-10", tmp_path / "resumed" / "checkpoint-10")
    assert run("--resume", tmp_path / "resumed" / "checkpoint-10", "--out", tmp_path / "resumed") == 0
    a = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_kill_during_checkpoint_writes_leaves_loadable_checkpoints(base, small_chat, tmp_path):
    out = tmp_path / "r"
    cmd = [sys.executable, str(REPO / "train.py"), "--data", str(small_chat), "--model", str(base), "--out", str(out),
           "--max-steps", "100000", "--save-every", "1", "--keep", "3", "--eval-fraction", "0"]
    proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while len(list(out.glob("checkpoint-*"))) < 3 and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(0.37)  # saving every step: the kill lands during or between writes
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert checkpoints
    for ckpt in checkpoints:  # every visible checkpoint is complete and loads
        assert {"adapter_config.json", "adapter_model.safetensors", "state.json", "trainable.safetensors",
                "optimizer.safetensors"} <= {p.name for p in ckpt.iterdir()}
        load_adapter(load_model(base), ckpt)
    last = int(checkpoints[-1].name.split("-")[1])
    assert run("--resume", out, "--max-steps", last + 2, "--save-every", 0) == 0  # and training continues from it
    assert (out / f"checkpoint-{last + 2}").is_dir()


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(base, small_chat, tmp_path):
    out = tmp_path / "r"
    cmd = [sys.executable, str(REPO / "train.py"), "--data", str(small_chat), "--model", str(base), "--out", str(out),
           "--max-steps", "100000", "--save-every", "0", "--eval-fraction", "0"]
    proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "train_config.json").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted: saved" in err
    ckpt = find_checkpoint(out)
    load_adapter(load_model(base), ckpt)


BAD_INPUTS = [
    ("not json\n", "1", "invalid JSON"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', "1", "no assistant"),
    ('{"messages": [{"role": "wizard", "content": "hi"}]}\n', "1", "role"),
    ('{"foo": 1}\n', "1", "format"),
    ('{"text": "ok"}\n{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}\n', "2", "string"),
    ("", None, "empty"),
    (b'{"text": "caf\xe9"}\n', "1", "UTF-8"),
]


@pytest.mark.parametrize("content,line,what", BAD_INPUTS)
def test_bad_input_exits_2_with_file_line_and_reason(base, tmp_path, content, line, what):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--data", str(path), "--model", str(base),
                           "--out", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith("error: ") and str(path) in message
    assert what.lower() in message.lower(), message
    if line is not None:
        assert f"{path}:{line}:" in message
    assert not (tmp_path / "out").exists()  # nothing written for a run that never started


def test_bad_kernel_setting_is_one_clear_line(small_chat, tmp_path):
    env = {**os.environ, "LORA_GEMM": "fastest"}
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--data", str(small_chat), "--out", str(tmp_path / "o")],
                          cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "LORA_GEMM='fastest'" in proc.stderr.strip().splitlines()[-1], proc.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flags,says", [(["--fp8"], "--fp8 needs an NVIDIA GPU with FP8 tensor cores"),
                                        (["--fp8", "--dora"], "does not go with --dora: drop one"),
                                        (["--fp8", "--quantize", "nf4"], "does not go with --quantize: drop one")])
def test_fp8_where_it_cannot_run_is_one_clear_line(small_chat, tmp_path, capsys, flags, says):
    """On this CPU (or a GPU before Hopper), or beside another way of changing the base: refused before loading."""
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9 and flags == ["--fp8"]:
        pytest.skip("this GPU runs --fp8")
    assert run("--data", small_chat, "--out", tmp_path / "o", *flags) == 2
    err = capsys.readouterr().err
    assert says in err.splitlines()[-1], err
    assert not (tmp_path / "o").exists()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="--fp8 needs a Hopper GPU (`pytest -m cuda` on the device machine)")
def test_fp8_trains_the_embedded_model(small_chat, tmp_path, capsys):
    """train.py --fp8 on a GPU: every decoder layer's LoRA in FP8, and the loss falls as in bf16."""
    out = tmp_path / "o"
    assert run("--data", small_chat, "--out", out, "--fp8", "--max-steps", 12, "--lr", "3e-3", "--log-every", 1,
               "--eval-fraction", 0, "--save-every", 0) == 0, capsys.readouterr().err
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])


def test_fp8_on_layer_sizes_it_cannot_take_is_one_clear_line(small_chat, tmp_path, capsys, monkeypatch):
    """A model whose sizes are not multiples of 16 (TMA's 16-byte rows of FP8), refused before loading; the device
    check is lifted here so that the CPU reaches it."""
    monkeypatch.setattr(train, "fp8_problem", lambda *args: None)
    model = tmp_path / "odd"
    shutil.copytree(REPO / "models" / "tiny-phi3", model)
    config = json.loads((model / "config.json").read_text())
    config["intermediate_size"] = 440
    (model / "config.json").write_text(json.dumps(config))
    assert run("--data", small_chat, "--model", model, "--out", tmp_path / "o", "--fp8") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--fp8: intermediate_size 440 in" in err and "multiples of 16: drop --fp8" in err, err
    assert not (tmp_path / "o").exists()


def test_missing_model_folder_is_one_clear_line(small_chat, tmp_path, capsys):
    assert run("--data", small_chat, "--model", tmp_path / "nope", "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert "checkpoint folder not found" in err.splitlines()[-1], err
    assert not (tmp_path / "o").exists()


@pytest.fixture
def lora_model(base):
    model = load_model(base)
    add_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.1))
    mark_only_lora_as_trainable(model)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.normal_(0, 0.05)
    return model.train()


def batches_of(base, n, batch_size, packing=False):
    tok = load_tokenizer(base)
    examples, _ = read_jsonl(CHAT, tok, max_seq_len=256)
    return make_batches(examples[:n], batch_size, 256, pad_token_for(tok), packing=packing, shuffle=False, seed=0)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def no_autocast():
    return torch.autocast("cpu", enabled=False)


def test_loss_is_token_weighted_across_accumulation(base, lora_model):
    lora_model.eval()  # dropout off: the two runs see the same function
    one = batches_of(base, 4, 4)
    four = batches_of(base, 4, 1)
    assert len({b.trained_tokens for b in four}) > 1  # unequal lengths: a mean of means would differ
    loss_one = train.accumulate_gradients(lora_model, one, "cpu", no_autocast)
    g_one = grads(lora_model)
    lora_model.zero_grad()
    loss_four = train.accumulate_gradients(lora_model, four, "cpu", no_autocast)
    g_four = grads(lora_model)
    mean_of_means = sum(train.batch_loss_sum(lora_model, b, "cpu").item() / b.trained_tokens for b in four) / 4
    assert abs(loss_one - loss_four) < 1e-5 and abs(loss_four - mean_of_means) > 1e-3
    for n in g_one:
        # padding changes the matmul shapes, so fp32 sums run in another order: compare normwise (elementwise
        # tolerances fail on elements that cancel to ~0); fp32 sums of this depth agree to ~1e-6 of the norm
        assert (g_four[n] - g_one[n]).norm() <= 1e-5 * g_one[n].norm(), n


def test_gradient_checkpointing_gives_the_same_gradients(base, lora_model):
    batch = batches_of(base, 3, 3)
    results = []
    for checkpointing, layers in ((False, None), (True, None), (True, 1), (True, 0)):  # (1: the first layer only)
        lora_model.recompute = Recompute(layers=layers) if checkpointing else None
        lora_model.zero_grad()
        torch.manual_seed(11)  # same dropout masks; checkpoint replays the RNG on recompute
        results.append((train.accumulate_gradients(lora_model, batch, "cpu", no_autocast), grads(lora_model)))
    (l0, g0), *others = results
    for l1, g1 in others:
        assert l0 == pytest.approx(l1, abs=1e-6) and g0.keys() == g1.keys()
        for n in g0:
            torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7)


def test_packed_and_unpacked_batches_give_the_same_loss(base, lora_model):
    lora_model.eval()
    unpacked, packed = batches_of(base, 12, 4), batches_of(base, 12, 4, packing=True)
    assert packed[0].document_ids is not None and len(packed) < len(unpacked)
    with torch.no_grad():
        total = lambda bs: sum(train.batch_loss_sum(lora_model, b, "cpu").item() for b in bs)
        assert sum(b.trained_tokens for b in packed) == sum(b.trained_tokens for b in unpacked)
        assert total(packed) == pytest.approx(total(unpacked), rel=1e-5)


def test_trained_adapter_and_merged_export_match_transformers(base, small_chat, tmp_path):
    transformers = transformers_or_skip()
    peft = pytest.importorskip("peft", reason="peft is the reference oracle; pip install peft")
    out, merged = tmp_path / "r", tmp_path / "merged"
    assert run("--data", small_chat, "--model", base, "--out", out, "--max-steps", 5, "--lr", 1e-2,
               "--targets", "q,v,o,gate_up,down", "--export-merged", merged) == 0
    base_weights = load_file(base / "model.safetensors")
    ours = load_adapter(load_model(base), out)
    assert all(torch.equal(p, base_weights[n]) for n, p in ours.state_dict().items() if ".lora_" not in n)
    ids = torch.randint(0, 32000, (2, 13))
    hf = peft.PeftModel.from_pretrained(transformers.Phi3ForCausalLM.from_pretrained(base), out).eval()
    hf_merged = transformers.Phi3ForCausalLM.from_pretrained(merged).eval()
    with torch.no_grad():
        expected = ours.eval()(ids)
        assert (expected - load_model(base)(ids)).abs().max() > 1e-3  # the adapter changed the model
        torch.testing.assert_close(hf(ids).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(hf_merged(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_lora_on_the_tied_lm_head_of_the_default_model(small_chat, tmp_path):
    """--targets qkv,lm_head on the shipped tiny model, whose lm_head is its embedding: peft computes what the saved
    adapter computes here, and --export-merged writes an untied model (lm_head W + s B A, the embedding W) that
    transformers loads with the same logits."""
    transformers = transformers_or_skip()
    peft = pytest.importorskip("peft", reason="peft is the reference oracle; pip install peft")
    out, merged, model = tmp_path / "r", tmp_path / "merged", Path("models/tiny-phi3")
    assert run("--data", small_chat, "--model", model, "--out", out, "--max-steps", 5, "--lr", 1e-2,
               "--targets", "qkv,lm_head", "--export-merged", merged) == 0
    assert json.loads((merged / "config.json").read_text())["tie_word_embeddings"] is False
    ids = torch.randint(0, 32000, (2, 13))
    ours = load_adapter(load_model(model), out).eval()
    fp32 = lambda folder: transformers.Phi3ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    hf = peft.PeftModel.from_pretrained(fp32(model), out).eval()
    with torch.no_grad():
        expected = ours(ids)
        assert (expected - load_model(model)(ids)).abs().max() > 1e-3  # the adapter changed the model
        torch.testing.assert_close(hf(ids).logits, expected, rtol=1e-5, atol=1e-5)
        hf_merged = fp32(merged)
        torch.testing.assert_close(hf_merged(ids).logits, expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(hf_merged.model.embed_tokens.weight, load_model(model).model.embed_tokens.weight)


def test_torchrun_two_processes_train_like_one_with_double_accumulation(base, small_chat, tmp_path):
    """2 processes x --grad-accum 1 == 1 process x --grad-accum 2: same data, token-weighted loss, summed grads.

    Both runs are subprocesses with one thread each, so every micro-batch's gradient is computed by the same
    kernels with the same blocking; the sum of the two micro-batches' gradients is then the same fp32 addition
    (a + b == b + a), so the adapters must be bit-identical. (An in-process run with several threads would round
    differently: that is what made this test fail on some machines with a tolerance of 1e-6.)"""
    common = ["--data", str(small_chat), "--model", str(base), "--max-steps", "4", "--batch-size", "2",
              "--dropout", "0", "--lr", "1e-2", "--eval-fraction", "0.2", "--log-every", "1", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(REPO / "train.py"), *common, "--out", str(tmp_path / "two")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, str(REPO / "train.py"), *common, "--grad-accum", "2", "--out",
                          str(tmp_path / "one")], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    a = load_file(tmp_path / "one" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    one_rows, two_rows = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert len(one_rows) == len(two_rows)
    for r1, r2 in zip(one_rows, two_rows):
        key = "loss" if "loss" in r1 else "eval_loss"
        # the logged losses are sums over processes in float64 of per-process fp32 sums: another order of
        # fp32 additions over ~10^2 token losses, relative error a few 1e-7
        assert r1["step"] == r2["step"] and r2[key] == pytest.approx(r1[key], rel=1e-5)


@pytest.mark.parametrize("flags,message", [
    (["--rank", "0"], "--rank must be > 0"),
    (["--targets", "attn"], "unknown LoRA target 'attn'"),
    (["--dropout", "1.5"], "--dropout must be in [0, 1)"),
    (["--keep-outputs", "-1"], "--keep-outputs must be auto or a number of layers >= 0"),
    (["--keep-outputs", "all"], "--keep-outputs must be auto or a number of layers >= 0"),
])
def test_impossible_flags_exit_2_before_loading(small_chat, tmp_path, capsys, flags, message):
    assert run("--data", small_chat, "--out", tmp_path / "o", *flags) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_keep_outputs_reaches_the_models_recompute():
    cfg = train.TrainConfig(gradient_checkpointing=True, offload_checkpoints=False)
    assert train.recompute_of(cfg).keep_outputs is None  # auto: the measured budget (phi3/recompute.py)
    assert train.recompute_of(dataclasses.replace(cfg, keep_outputs="3")).keep_outputs == 3


def test_full_training_from_random_init_saves_a_hugging_face_checkpoint(base, small_chat, tmp_path):
    transformers = transformers_or_skip()
    out = tmp_path / "full"
    assert run("--data", small_chat, "--model", base, "--out", out, "--full", "--init", "random", "--max-steps", 3,
               "--lr", 1e-3, "--train-on", "all", "--packing", "--max-seq-len", 256, "--eval-fraction", 0) == 0
    trained = load_model(out)
    start = train.build_model(train.TrainConfig(model=str(base), full=True, init="random"), torch.device("cpu"),
                              torch.float32)  # the same seed's random init
    changed = [n for n, p in trained.state_dict().items() if not torch.equal(p, start.state_dict()[n])]
    assert "model.layers.0.self_attn.qkv_proj.weight" in changed and "model.norm.weight" in changed
    assert (out / "tokenizer.json").exists() and (out / "checkpoint-3" / "model.safetensors").exists()
    ids = torch.randint(0, 32000, (1, 9))
    with torch.no_grad():
        hf = transformers.Phi3ForCausalLM.from_pretrained(out).eval()
        torch.testing.assert_close(hf(ids).logits, trained(ids), rtol=1e-5, atol=1e-5)


def test_broken_weights_stop_the_run_before_anything_is_written(base, small_chat, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(base, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 3])
    assert run("--data", small_chat, "--model", broken, "--out", tmp_path / "o") == 2
    assert "truncated or corrupt" in capsys.readouterr().err.splitlines()[-1]
    assert not (tmp_path / "o").exists()


# ---- trust: interrupted runs, resumed folders, hostile checkpoints and flags ---------------------------------

def train_process(*args, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), *map(str, args)], cwd=REPO,
                            stderr=subprocess.PIPE, text=True, env=env)


def test_any_number_of_ctrl_c_and_resume_trains_exactly_like_one_run(base, small_chat, tmp_path):
    """SIGINT or SIGTERM at arbitrary moments (during steps, evals, saves), then --resume, until the run ends."""
    common = ["--data", small_chat, "--model", base, "--max-steps", 60, "--lr", 1e-3, "--dropout", 0.1,
              "--batch-size", 2, "--eval-every", 7, "--save-every", 5, "--log-every", 1]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # the same kernels in every process
    straight = train_process(*common, "--out", tmp_path / "straight", env=env)
    assert straight.wait(timeout=300) == 0, straight.stderr.read()
    out = tmp_path / "stopped"
    progress = lambda: len((out / "metrics.jsonl").read_text().splitlines()) if (out / "metrics.jsonl").exists() else 0
    # (seconds to wait, counted from the start of the process or from its k-th new line of metrics). The lines, not
    # only the seconds, place the stops: a fast CPU can run the rest of the 60 steps within a second, and a stop
    # that comes after the run's end is no stop.
    plan = [(0.3, "start", 0), (0.0, "step", 1), (0.04, "step", 3), (0.01, "step", 2), (0.07, "step", 4),
            (0.02, "step", 1), (None, "", 0)]
    stops = []
    for delay, after, lines in plan:
        resume = ["--resume", out] if list(out.glob("checkpoint-*")) else [*common, "--out", out]
        seen = progress()
        proc = train_process(*resume, env=env)
        deadline = time.time() + 120
        while after == "step" and progress() < seen + lines and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        if delay is not None:
            time.sleep(delay)
            proc.send_signal(signal.SIGINT if len(stops) % 2 == 0 else signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
        stops.append(proc.returncode)
        # 130: stopped at a step boundary, checkpoint saved; -SIGINT: stopped while starting up, nothing written
        assert proc.returncode in (0, 130, -signal.SIGINT) and "Traceback" not in err, err
        if proc.returncode == -signal.SIGINT:
            assert not out.exists() or not list(out.iterdir())
        if proc.returncode == 0:
            break
    assert stops.count(130) >= 4 and stops[-1] == 0, stops
    a = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    b = load_file(out / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = lambda d: {r["step"]: r["loss"] for r in metrics(d) if "loss" in r}
    assert losses(out) == losses(tmp_path / "straight")  # redone steps replaced their old lines


def test_signal_handler_only_sets_a_flag_and_the_step_completes(base, small_chat, tmp_path, monkeypatch):
    """A stop requested between optimizer.step() and the step counter (the old handler raised there) saves
    the state of the step that finished, once."""
    real_step = torch.optim.AdamW.step
    calls = []

    def step_then_signal(self, *a, **k):
        result = real_step(self, *a, **k)
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # lands right after the update
        return result
    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_signal)
    out = tmp_path / "r"
    assert run("--data", small_chat, "--model", base, "--out", out, "--max-steps", 10, "--eval-fraction", 0) == 130
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-3"] and len(calls) == 3
    assert json.loads((out / "checkpoint-3" / "state.json").read_text())["step"] == 3


def test_resumed_run_writes_only_in_the_folder_it_was_given(base, small_chat, tmp_path):
    original = tmp_path / "original"
    assert run("--data", small_chat, "--model", base, "--out", original, "--max-steps", 4, "--save-every", 2,
               "--eval-fraction", 0) == 0
    before = sorted((p.relative_to(original), p.stat().st_mtime_ns) for p in original.rglob("*"))
    moved = tmp_path / "moved"
    shutil.copytree(original, moved)
    elsewhere = tmp_path / "elsewhere"
    for cfg_file in moved.rglob("train_config.json"):  # a tampered or stale config naming another folder
        cfg = json.loads(cfg_file.read_text())
        cfg["out"] = str(elsewhere)
        cfg_file.write_text(json.dumps(cfg))
    assert run("--resume", moved, "--max-steps", 8, "--save-every", 2, "--keep", 1) == 0
    assert sorted((p.relative_to(original), p.stat().st_mtime_ns) for p in original.rglob("*")) == before
    assert not elsewhere.exists()
    assert [p.name for p in list_checkpoints(moved)] == ["checkpoint-8"]
    assert json.loads((moved / "train_config.json").read_text())["out"] == str(moved)


def test_out_folder_of_another_run_is_refused(base, small_chat, tmp_path, capsys):
    out = tmp_path / "r"
    assert run("--data", small_chat, "--model", base, "--out", out, "--max-steps", 2, "--eval-fraction", 0) == 0
    before = sorted(p.name for p in out.iterdir())
    assert run("--data", small_chat, "--model", base, "--out", out, "--max-steps", 2) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: --out") and "--resume" in err
    assert sorted(p.name for p in out.iterdir()) == before


def test_finished_run_resumed_says_so_and_changes_nothing(base, small_chat, tmp_path, capsys):
    out = tmp_path / "r"
    assert run("--data", small_chat, "--model", base, "--out", out, "--max-steps", 2, "--eval-fraction", 0) == 0
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.rglob("*"))
    assert run("--resume", out) == 0
    assert "already finished" in capsys.readouterr().err
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.rglob("*")) == before


def test_checkpoints_are_never_unpickled(base, small_chat, tmp_path, capsys):
    """An old-style state.pt (a pickle) that would run code when loaded: refused, and the code never runs."""
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    ckpt = tmp_path / "run" / "checkpoint-3"
    ckpt.mkdir(parents=True)
    torch.save({"step": Payload()}, ckpt / "state.pt")
    assert run("--resume", tmp_path / "run") == 2
    assert "pickle" in capsys.readouterr().err.splitlines()[-1]
    assert not marker.exists()
    assert not any("torch.load" in line and "weights_only=True" not in line
                   for f in ["train.py", *(REPO / "phi3").glob("*.py")] for line in Path(REPO / f).read_text().splitlines())


@pytest.fixture(scope="module")
def finished_run(base, small_chat, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "r"
    assert run("--data", small_chat, "--model", base, "--out", out, "--max-steps", 4, "--save-every", 2,
               "--keep", 5, "--eval-fraction", 0, "--rank", 4) == 0
    return out


def _tamper_tensors(name, change):
    def f(ckpt):
        tensors = load_file(ckpt / name)
        change(tensors)
        from safetensors.torch import save_file
        save_file(tensors, ckpt / name)
    return f


def _first(tensors):
    return next(iter(sorted(tensors)))


HOSTILE_CHECKPOINTS = [
    ("unknown tensor", _tamper_tensors("trainable.safetensors", lambda t: t.update(extra=torch.zeros(2))), "unknown"),
    ("missing tensor", _tamper_tensors("trainable.safetensors", lambda t: t.pop(_first(t))), "lacks"),
    ("wrong shape", _tamper_tensors("trainable.safetensors", lambda t: t.update({_first(t): torch.zeros(3, 3)})), "shape"),
    ("int tensor", _tamper_tensors("trainable.safetensors",
                                   lambda t: t.update({_first(t): t[_first(t)].to(torch.int32)})), "float"),
    ("nan weights", _tamper_tensors("trainable.safetensors", lambda t: t[_first(t)].fill_(float("nan"))), "NaN"),
    ("nan moments", _tamper_tensors("optimizer.safetensors", lambda t: t[_first(t)].fill_(float("inf"))), "NaN"),
    ("truncated", lambda c: (c / "trainable.safetensors").write_bytes((c / "trainable.safetensors").read_bytes()[:100]),
     "corrupt"),
    ("garbage", lambda c: (c / "optimizer.safetensors").write_bytes(os.urandom(300)), "corrupt"),
    ("state not json", lambda c: (c / "state.json").write_text("{step: 4"), "not valid JSON"),
    ("state deep", lambda c: (c / "state.json").write_text("[" * 100000), "not valid JSON"),
    ("state a fifo", lambda c: ((c / "state.json").unlink(), os.mkfifo(c / "state.json")), "not a regular file"),
    ("trainable a fifo", lambda c: ((c / "trainable.safetensors").unlink(), os.mkfifo(c / "trainable.safetensors")),
     "not a regular file"),
    ("state wrong types", lambda c: (c / "state.json").write_text(
        '{"format": 2, "step": "4", "position": {"epoch": 0, "batch": 1}, "processes": 1}'), "non-negative integers"),
    ("negative position", lambda c: (c / "state.json").write_text(
        '{"format": 2, "step": 4, "position": {"epoch": -1, "batch": 1}, "processes": 1}'), "non-negative integers"),
    ("no process count", lambda c: (c / "state.json").write_text(
        '{"format": 2, "step": 4, "position": {"epoch": 0, "batch": 1}, "processes": 0}'), "process count"),
    ("position past the data", lambda c: (c / "state.json").write_text(
        '{"format": 2, "step": 4, "position": {"epoch": 0, "batch": 99999}, "processes": 1}'), "past the"),
    ("config wrong type", lambda c: (c / "train_config.json").write_text(
        (c / "train_config.json").read_text().replace('"rank": 4', '"rank": "4"')), "rank"),
    ("config not an object", lambda c: (c / "train_config.json").write_text("[1]"), "expected a JSON object"),
    ("config nan lr", lambda c: (c / "train_config.json").write_text(
        (c / "train_config.json").read_text().replace('"lr": 0.0002', '"lr": NaN')), "finite"),
    ("no config", lambda c: (c / "train_config.json").unlink(), "missing"),
    ("config unknown field", lambda c: (c / "train_config.json").write_text(
        (c / "train_config.json").read_text().replace('"rank": 4', '"rank": 4, "run_this": "rm -rf /"')), "fields differ"),
    ("config bad checkpoint layers", lambda c: (c / "train_config.json").write_text(
        (c / "train_config.json").read_text().replace('"checkpoint_layers": null', '"checkpoint_layers": "all"')),
     "checkpoint_layers"),
]


@pytest.mark.parametrize("name,tamper,what", HOSTILE_CHECKPOINTS, ids=[h[0] for h in HOSTILE_CHECKPOINTS])
def test_hostile_checkpoint_is_one_clear_line(finished_run, tmp_path, name, tamper, what):
    run_dir = tmp_path / "copy"
    shutil.copytree(finished_run, run_dir)
    ckpt = run_dir / "checkpoint-2"
    for later in ("checkpoint-4",):
        shutil.rmtree(run_dir / later)
    tamper(ckpt)
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--resume", str(ckpt)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith("error: ") and what.lower() in message.lower(), message
    assert not [c for c in list_checkpoints(run_dir) if c.name.endswith("-3")]


def test_a_run_saved_before_the_newer_flags_resumes_with_their_defaults(finished_run, tmp_path, capsys):
    """train_config.json of an earlier version (no offload_checkpoints, checkpoint_layers, dora, trainable_tokens)
    still resumes."""
    run_dir = tmp_path / "old"
    shutil.copytree(finished_run, run_dir)
    shutil.rmtree(run_dir / "checkpoint-4")
    saved = run_dir / "checkpoint-2" / "train_config.json"
    old = {k: v for k, v in json.loads(saved.read_text()).items() if k not in ADDED_LATER}
    saved.write_text(json.dumps(old))
    assert run("--resume", run_dir / "checkpoint-2") == 0, capsys.readouterr().err
    assert "checkpoint-4" in [p.name for p in list_checkpoints(run_dir)]


def test_resume_with_a_flag_that_reshapes_the_run_is_refused(finished_run, capsys):
    assert run("--resume", finished_run / "checkpoint-2", "--rank", 8, "--out", finished_run.parent / "x") == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert "--rank 8 differs from the resumed run's 4" in err


def test_stale_temporary_folders_of_a_killed_write_are_cleaned(finished_run, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(finished_run, run_dir)
    (run_dir / ".checkpoint-6.tmp-0123abcd").mkdir()
    (run_dir / ".checkpoint-6.tmp-0123abcd" / "half.safetensors").write_bytes(b"x")
    (run_dir / ".adapter_model.safetensors.tmp-89abcdef").write_bytes(b"x")
    os.replace(run_dir / "checkpoint-2", run_dir / ".checkpoint-2.old-00000000")  # killed between two renames
    assert run("--resume", run_dir, "--max-steps", 5, "--save-every", 0) == 0
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]
    assert [p.name for p in list_checkpoints(run_dir)] == ["checkpoint-2", "checkpoint-4", "checkpoint-5"]


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_state(base, small_chat, tmp_path, monkeypatch, capsys):
    real = train.accumulate_gradients
    calls = []

    def poisoned(*a, **k):
        calls.append(1)
        return float("nan") if len(calls) == 4 else real(*a, **k)
    monkeypatch.setattr(train, "accumulate_gradients", poisoned)
    out = tmp_path / "r"
    assert run("--data", small_chat, "--model", base, "--out", out, "--max-steps", 10, "--eval-fraction", 0,
               "--save-every", 2) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: step 4: the loss (nan)") and "checkpoint-3" in err and "--lr" in err
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-3"]
    assert not (out / "adapter_model.safetensors").exists()  # no final adapter from a failed run


def test_tokens_per_second_counts_training_time_only(base, small_chat, tmp_path, monkeypatch):
    """A fake clock that advances 1 s per reading: each step's window is exactly 1 s, whatever evals and saves
    happen between steps (the old code restarted the timer at evals but not the token count)."""
    clock = iter(range(10**6))
    monkeypatch.setattr(train.time, "perf_counter", lambda: float(next(clock)))
    out = tmp_path / "r"
    assert run("--data", small_chat, "--model", base, "--out", out, "--max-steps", 8, "--log-every", 4,
               "--eval-every", 2, "--batch-size", 2, "--eval-fraction", 0) == 0
    tok = load_tokenizer(base)
    examples, _ = read_jsonl(small_chat, tok, max_seq_len=2048)
    batches = make_batches(examples, 2, 2048, pad_token_for(tok), packing=False, shuffle=True, seed=0, epoch=0)
    real = [int((b.input_ids != pad_token_for(tok)).sum()) for b in batches]
    rows = [r for r in metrics(out) if "tokens_per_s" in r]
    assert [r["step"] for r in rows] == [4, 8]
    assert rows[0]["tokens_per_s"] == pytest.approx(sum(real[:4]) / 4)
    assert rows[1]["tokens_per_s"] == pytest.approx(sum(real[4:8]) / 4)


def test_loss_plot_is_written(finished_run):
    pytest.importorskip("matplotlib", reason="requirements.txt installs matplotlib for loss.png")
    assert (finished_run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_failed_write_is_one_line_and_keeps_the_last_checkpoint(base, small_chat, tmp_path, monkeypatch, capsys):
    """A full disk while writing checkpoint-4: one line, exit 2, checkpoint-2 intact, no half-written folder."""
    import phi3.atomic as atomic
    from safetensors import SafetensorError
    real = atomic.save_file

    def disk_full(tensors, path, *a, **k):  # what safetensors raises on a full disk
        if "checkpoint-4" in str(path):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, path, *a, **k)
    monkeypatch.setattr(atomic, "save_file", disk_full)
    out = tmp_path / "r"
    assert run("--data", small_chat, "--model", base, "--out", out, "--max-steps", 6, "--save-every", 2,
               "--eval-fraction", 0) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "No space left on device" in err
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("flags,message", [
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--lr", "inf"], "--lr must be a finite number"),
    (["--warmup", "nan"], "--warmup must be a finite number"),
    (["--epochs", "nan"], "--epochs must be a finite number"),
    (["--alpha", "nan"], "--alpha must be a finite number"),
    (["--max-grad-norm", "nan"], "--max-grad-norm must be a finite number"),
    (["--epochs", "0"], "--epochs must be > 0"),
    (["--checkpoint-layers", "-1"], "--checkpoint-layers must be >= 0"),
    (["--checkpoint-layers", "all"], "invalid int value"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--max-steps", "0"], "--max-steps must be in [1, 2147483647]"),
    (["--max-steps", str(2**31)], "--max-steps must be in [1, 2147483647]"),
    (["--warmup", "1e300"], "--warmup must be at most"),
    (["--epochs", "1e300"], "lower --epochs"),
    (["--epochs", "1e308"], "lower --epochs"),
    (["--seed", "-1"], "--seed must be in"),
    (["--device", "bogus"], "--device 'bogus' is not a device"),
    (["--device", "mps"], "only cpu and cuda"),
    (["--lr", "2"], "--lr must be <= 1"),
    (["--out", ""], "--out must name a folder"),
    (["--max-seq-len", "100000000"], "longer than the model's context (4096 tokens"),
    (["--rank", "100000"], "--rank 100000 is larger than the smallest side of the adapted layers (192)"),
    (["--grad-accum", "100000000"], "more than the 12 of a whole epoch"),
    pytest.param(["--device", "cuda"], "no CUDA GPU", marks=pytest.mark.skipif(torch.cuda.is_available(),
                                                                                reason="this machine has a GPU")),
])
def test_non_finite_and_impossible_flags_exit_2(small_chat, tmp_path, capsys, flags, message):
    assert run("--data", small_chat, "--out", tmp_path / "o", *flags) == 2
    err = capsys.readouterr().err.strip().splitlines()  # (checks that need the model's config follow the config line)
    assert [line for line in err if line.startswith("error")] == err[-1:] and message in err[-1], err
    assert not (tmp_path / "o").exists()


def test_export_into_a_folder_of_other_files_is_refused(small_chat, tmp_path, capsys):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "thesis.tex").write_text("x")
    assert run("--data", small_chat, "--out", tmp_path / "o", "--export-merged", tmp_path / "docs") == 2
    assert "--export-merged" in capsys.readouterr().err.splitlines()[-1]
    assert (tmp_path / "docs" / "thesis.tex").read_text() == "x" and not (tmp_path / "o").exists()


def test_out_that_cannot_be_a_folder_exits_2(small_chat, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for out, what in ((a_file, "is a file"), (a_file / "sub" / "run", "is under")):
        assert run("--data", small_chat, "--out", out) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and what in err[0], err
    assert a_file.read_text() == "x"


def test_read_only_out_exits_2(small_chat, tmp_path, capsys):
    """A folder the user cannot write in. Root writes into any folder whatever its mode, so under root (CI) the
    folder is one the kernel refuses to root too: a new folder in sysfs."""
    if os.geteuid() == 0:
        assert run("--data", small_chat, "--out", "/sys/phi3-lora-test/run") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: /sys/phi3-lora-test") and (
            "not permitted" in err[0] or "Read-only" in err[0] or "not a writable folder" in err[0]), err
        assert not os.path.exists("/sys/phi3-lora-test")
        return
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert run("--data", small_chat, "--out", locked / "run") == 2
        assert "not a writable folder" in capsys.readouterr().err
    finally:
        locked.chmod(0o755)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_cuda_ten_steps_resume_ten_steps_equals_twenty(tmp_path):
    """On the GPU, with its kernels: each run is its own process, and the resumed one computes the same bits (the
    kernels' choices come from the shipped table or the rule, the same in every process)."""
    from phi3 import Phi3Config, Phi3ForCausalLM, save_model
    config = Phi3Config(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                        num_key_value_heads=16, sliding_window=2047)
    model = Phi3ForCausalLM(config)
    model.init_weights(seed=1)
    base = tmp_path / "base"
    save_model(model.to(torch.bfloat16), base, tokenizer_from=REPO / "assets" / "tokenizer")
    # packed rows of 1024 tokens, batch 4: 4096 tokens per micro-batch
    common = ["--data", CHAT, "--model", base, "--packing", "--max-seq-len", 1024, "--batch-size", 4,
              "--max-steps", 20, "--lr", 1e-3, "--eval-fraction", 0, "--keep", 5]
    env = {k: v for k, v in os.environ.items() if k != "LORA_GEMM"}
    straight = subprocess.run([sys.executable, str(REPO / "train.py"), *map(str, common), "--save-every", "10",
                               "--out", str(tmp_path / "straight")], cwd=REPO, env=env, capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr[-3000:]
    shutil.copytree(tmp_path / "straight" / "checkpoint-10", tmp_path / "resumed" / "checkpoint-10")
    resumed = subprocess.run([sys.executable, str(REPO / "train.py"), "--resume", str(tmp_path / "resumed")],
                             cwd=REPO, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[0]}"


def test_tokenizer_from_another_model_is_refused_before_loading(small_chat, tmp_path, capsys):
    model = tmp_path / "mixed"
    shutil.copytree(REPO / "models" / "tiny-phi3", model)
    config = json.loads((model / "config.json").read_text())
    config["vocab_size"] = 32005  # below the tokenizer's 32011 ids: an embedding lookup would fail mid-training
    (model / "config.json").write_text(json.dumps(config))
    assert run("--data", small_chat, "--model", model, "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "tokenizer.json has 32011 tokens, more than the model's 32005" in err, err
    assert not (tmp_path / "o").exists()


def test_links_in_a_resumed_run_folder_never_lead_writes_outside(finished_run, tmp_path):
    """A run folder from elsewhere whose metrics.jsonl and a checkpoint are links to files and folders outside it:
    resuming appends, rewrites and deletes only inside the folder."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep me\n")
    shutil.copytree(finished_run / "checkpoint-2", outside / "checkpoint-1")  # a complete-looking checkpoint
    run_dir = tmp_path / "copy"
    shutil.copytree(finished_run, run_dir)
    (run_dir / "metrics.jsonl").unlink()
    (run_dir / "metrics.jsonl").symlink_to(outside / "precious.txt")
    (run_dir / "checkpoint-1").symlink_to(outside / "checkpoint-1")
    assert run("--resume", run_dir, "--max-steps", 7, "--save-every", 1, "--keep", 1) == 0
    assert (outside / "precious.txt").read_text() == "keep me\n"
    assert (outside / "checkpoint-1" / "state.json").is_file()
    assert not (run_dir / "metrics.jsonl").is_symlink() and (run_dir / "metrics.jsonl").read_text()
    assert [p.name for p in list_checkpoints(run_dir)] == ["checkpoint-7"]


def test_ddp_accumulation_counts_every_micro_batch_once(base, lora_model):
    """The DDP path of accumulate_gradients (no_sync for all but the last micro-batch, then a summing reduce),
    in a one-process group: the gradients must be bit-identical to plain accumulation."""
    import torch.distributed as dist
    from phi3 import distributed
    lora_model.eval()  # dropout off
    four = batches_of(base, 4, 1)
    train.accumulate_gradients(lora_model, four, "cpu", no_autocast)
    plain = grads(lora_model)
    lora_model.zero_grad(set_to_none=True)
    # An in-memory store (no rendezvous file) and a timeout: a collective that never completes fails the test
    # instead of hanging the suite (one full CI run of ~450 hung here once on a file store, untimed).
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=timedelta(seconds=120))
    try:  # World says 2 so that data_parallel wraps the module; the group itself has this one process
        ddp = distributed.data_parallel(train.MicroBatchLoss(lora_model), distributed.World(0, 2), torch.device("cpu"))
        train.accumulate_gradients(ddp, four, "cpu", no_autocast)
    finally:
        dist.destroy_process_group()
    reduced = grads(lora_model)
    assert plain.keys() == reduced.keys() and all(torch.equal(plain[n], reduced[n]) for n in plain)


class _Bucket:  # the one method of DDP's GradBucket the hook uses
    def __init__(self, tensor):
        self.tensor = tensor

    def buffer(self):
        return self.tensor


def test_ddp_hook_hands_back_a_finished_sum():
    """The DDP hook returns its sum already done. A hook that chains a Python callback on gloo's future leaves that
    callback for gloo's worker thread to release, which takes the GIL; a DDP module freed at that moment deadlocked
    (the main thread, holding the GIL, joined the worker). Such a future is still pending when the hook returns."""
    import torch.distributed as dist
    from phi3 import distributed
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=timedelta(seconds=120))
    try:
        grads = torch.randn(1_000_000)
        expected = grads.clone()
        summed = distributed._sum_gradients(None, _Bucket(grads))
        assert summed.done() and torch.equal(summed.value(), expected)  # one process: the sum is itself
    finally:
        dist.destroy_process_group()


def _gloo_threads() -> list[str]:
    return [n for n in (Path(f"/proc/self/task/{t}/comm").read_text().strip() for t in os.listdir("/proc/self/task"))
            if "gloo" in n]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread names from Linux's /proc")
def test_shutdown_ends_gloo_threads_though_dtensor_caches_keep_the_mesh():
    """After a sharded op, DTensor's caches keep the DeviceMesh, which keeps the process group: destroying the group
    left gloo's threads running into the interpreter's exit, where the group's late end sometimes aborted the
    process. distributed.shutdown ends them before it returns."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from phi3 import distributed
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=timedelta(seconds=120))
    mesh = init_device_mesh("cpu", (1,))
    distributed._meshes.append(mesh)  # as distributed.shard() does
    x = distribute_tensor(torch.randn(4, 4), mesh, [Shard(0)])
    (x @ x).full_tensor()  # through DTensor's sharding propagation: its caches now hold the mesh
    del x, mesh
    assert _gloo_threads()
    distributed.shutdown(distributed.World(rank=0, size=2))  # (the size only says: a torchrun run)
    assert not _gloo_threads() and not dist.is_initialized()


def test_killed_torchrun_worker_stops_the_run_which_resumes_exactly_on_one_process(base, small_chat, tmp_path):
    """SIGKILL one of two torchrun processes: the run stops (torchrun ends the other), the last complete checkpoint
    loads, and resuming it in one process (which then takes both processes' micro-batches per step) trains exactly
    like one process with --grad-accum 2 from the start."""
    common = ["--data", small_chat, "--model", base, "--batch-size", 2, "--dropout", 0, "--lr", 1e-3,
              "--lr-schedule", "constant", "--warmup", 0, "--eval-fraction", 0, "--device", "cpu"]  # lr: no total
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    out = tmp_path / "killed"
    last = kill_a_worker_past_step(common, out, 4, env)
    resumed = subprocess.run([sys.executable, str(REPO / "train.py"), "--resume", str(out), "--max-steps",
                              str(last + 2)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((out / "train_config.json").read_text())["grad_accum"] == 2
    straight = subprocess.run([sys.executable, str(REPO / "train.py"), *map(str, common), "--grad-accum", "2",
                               "--max-steps", str(last + 2), "--out", str(tmp_path / "straight")],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-3000:]
    a = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    b = load_file(out / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_offload_checkpoints_on_the_cpu_is_a_note_not_an_error(base, small_chat, tmp_path, capsys):
    """--offload-checkpoints (or a resumed GPU run's saved choice) on the CPU: said once, the run goes on without it."""
    out = tmp_path / "o"
    assert run("--data", small_chat, "--model", base, "--out", out, "--max-steps", 1, "--offload-checkpoints",
               "--gradient-checkpointing") == 0
    err = capsys.readouterr().err
    assert "--offload-checkpoints applies only with gradient checkpointing on a CUDA device" in err
    assert json.loads((out / "train_config.json").read_text())["offload_checkpoints"] is False


@pytest.mark.parametrize("name", ["phi4mini", "phi4"])
def test_phi4_geometries_train_resume_merge_and_chat(small_chat, tmp_path, capsys, name):
    """train.py on Phi-4-mini's and Phi-4's geometries (partial rotary, grouped heads of 128, tied 200k or untied
    100k vocabularies) with their own tokenizers and chat formats (models/tokenizers): the loss falls, a stopped run
    resumes to the same adapter as a straight one, the merged export computes what base + adapter does, and sample.py
    answers with the adapter."""
    from test_phi4_tokenizer import unpack
    from tiny import save_hf
    base = tmp_path / "base"
    save_hf(name, base, seed=3)
    tokenizer = unpack(REPO / "models" / "tokenizers" / {"phi4mini": "phi-4-mini-instruct", "phi4": "phi-4"}[name],
                       tmp_path / "tokenizer")
    for f in tokenizer.iterdir():  # (over transformers' generation_config.json: the model's own)
        shutil.copy(f, base / f.name)
    common = ["--data", small_chat, "--model", base, "--max-steps", 6, "--lr", 3e-3, "--eval-fraction", 0,
              "--max-seq-len", 96, "--targets", "q,k,v,o,gate_up,down", "--log-every", 1]
    assert run(*common, "--out", tmp_path / "straight", "--save-every", 3, "--export-merged", tmp_path / "merged") == 0
    losses = [r["loss"] for r in metrics(tmp_path / "straight")]
    assert losses[-1] < losses[0]
    shutil.copytree(tmp_path / "straight" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    assert run("--resume", tmp_path / "resumed") == 0
    a = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(0, 32000, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "merged")(ids),
                                   load_adapter(load_model(base), tmp_path / "straight")(ids), rtol=1e-4, atol=1e-4)
    capsys.readouterr()
    assert sample.main(["--model", str(base), "--adapter", str(tmp_path / "straight"), "--prompt", "Hi",
                        "--max-new-tokens", "4"]) == 0
    assert "tokens" in capsys.readouterr().err


ADAPTER_KINDS = {  # flags -> the model, and the kinds of tensor the run trains (besides lora_A / lora_B)
    "dora": (["--dora", "--dropout", "0.1"], None, {"lora_magnitude"}),
    "embed_tokens": (["--targets", "qkv,o,embed_tokens"], None, {"lora_embedding_A", "lora_embedding_B"}),
    "tokens": (["--trainable-tokens", "<|placeholder1|>,5,<|end|>"], None, {"lora_token_rows"}),
    "tokens-tied": (["--trainable-tokens", "<|placeholder1|>,32000", "--targets", "q,v"], REPO / "models" / "tiny-phi3",
                    {"lora_token_rows"}),
}


@pytest.mark.parametrize("kind", ADAPTER_KINDS)
def test_each_adapter_kind_resumes_exactly_exports_and_loads_in_peft(base, small_chat, tmp_path, kind):
    """--dora, LoRA on embed_tokens, --trainable-tokens (untied: embedding and lm_head rows; tied: one set): the
    checkpoints hold the new trained tensors and 2 steps + resume + 2 steps is the 4-step run bit for bit; peft
    computes what the adapter computes here; --export-merged holds base + adapter."""
    from peft_oracle import peft_model
    flags, model, extra = ADAPTER_KINDS[kind]
    model = model or base
    common = ["--data", small_chat, "--model", model, "--max-steps", 4, "--lr", 1e-2, "--batch-size", 2, "--rank", 4,
              "--eval-fraction", 0, *flags]
    assert run(*common, "--out", tmp_path / "straight", "--save-every", 2, "--export-merged", tmp_path / "merged") == 0
    trained = load_file(tmp_path / "straight" / "checkpoint-2" / "trainable.safetensors")
    assert {name.rsplit(".", 1)[1] for name in trained} == {"lora_A", "lora_B"} | extra
    shutil.copytree(tmp_path / "straight" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    assert run("--resume", tmp_path / "resumed") == 0
    a = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ours = load_adapter(load_model(model), tmp_path / "straight").eval()
    ids = torch.tensor([[1, 5, 32002, 900, 32007, 5, 32000, 17]])
    with torch.no_grad():
        expected = ours(ids)
        assert (expected - load_model(model)(ids)).abs().max() > 1e-3  # the adapter changed the model
        theirs = peft_model(model, tmp_path / "straight").eval()
        torch.testing.assert_close(theirs(ids).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(load_model(tmp_path / "merged")(ids), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("flags,message", [
    (["--dora", "--targets", "qkv,embed_tokens"], "--dora with embed_tokens in --targets is not supported"),
    (["--full", "--dora"], "--full trains every weight"),
    (["--trainable-tokens", "5,,6"], "has an empty item"),
    (["--trainable-tokens", "5", "--targets", "qkv,embed_tokens"], "the embedding takes one kind of adapter"),
    (["--trainable-tokens", "no-such-token"], "'no-such-token' is not a token of"),
    (["--trainable-tokens", "99999"], "99999 is not a token id of"),
    (["--trainable-tokens", "32000,<|endoftext|>"], "'<|endoftext|>' is token 32000, given already as '32000'"),
    (["--trainable-tokens", "5", "--targets", "qkv,lm_head"], "(tied), trains the tokens' lm_head rows too; drop lm_head"),
])
def test_adapter_kind_flags_that_cannot_work_exit_2(small_chat, tmp_path, capsys, flags, message):
    assert run("--data", small_chat, "--out", tmp_path / "o", *flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert [line for line in err if line.startswith("error")] == err[-1:] and message in err[-1], err
    assert not (tmp_path / "o").exists()


def test_a_step_that_runs_out_of_memory_while_keeping_outputs_runs_again_keeping_fewer(base, small_chat, tmp_path,
                                                                                          monkeypatch, capsys):
    """The kept-output budget (phi3/recompute.py) can misjudge the allocator's fragmentation: the step that runs out
    of memory runs again from its start keeping at most half as many layers' outputs, with the same dropout draws,
    and the run ends with the adapter of a run that never ran out. (On the CPU the budget keeps nothing: here it is
    made to keep 2 layers, and step 2's second micro-batch to run out, after its first one's gradients were summed.)"""
    import phi3.model
    from phi3.recompute import Kept, KeptOutputBudget
    passes, decided = [], []

    def keeps_two(self, checkpointed, layer_bytes, tokens, device):
        self.last_layers = min(2, checkpointed, 2 if self.ceiling is None else self.ceiling)
        decided.append(self.last_layers)
        return self.last_layers

    class RunsOut(Kept):
        def __init__(self, outputs):
            if outputs and len(decided) == 4 and not passes:
                passes.append("ran out")
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            super().__init__(outputs)

    monkeypatch.setattr(KeptOutputBudget, "layers", keeps_two)
    common = ["--data", small_chat, "--model", base, "--max-steps", 5, "--lr", 1e-3, "--dropout", 0.1, "--grad-accum",
              2, "--gradient-checkpointing", "--eval-fraction", 0, "--log-every", 1]
    assert run(*common, "--out", tmp_path / "straight") == 0
    assert decided == [2] * 10  # two micro-batches a step
    decided.clear()
    monkeypatch.setattr(phi3.model, "Kept", RunsOut)
    assert run(*common, "--out", tmp_path / "again") == 0
    assert passes == ["ran out"] and decided == [2] * 4 + [1] * 8  # step 2 twice, then at most half
    assert "note: step 2 ran out of GPU memory with 2 layers keeping their outputs" in capsys.readouterr().err
    assert [r["loss"] for r in metrics(tmp_path / "straight")] == [r["loss"] for r in metrics(tmp_path / "again")]
    a = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    b = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_running_out_of_memory_keeping_nothing_is_the_one_line_error(base, small_chat, tmp_path, monkeypatch, capsys):
    def runs_out(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
    monkeypatch.setattr(train, "accumulate_gradients", runs_out)
    assert run("--data", small_chat, "--model", base, "--out", tmp_path / "r", "--max-steps", 3) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: out of GPU memory") and "--keep-outputs 0" in err[-1]
    assert not any("runs again" in line for line in err)
