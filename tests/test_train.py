"""train.py on tiny models (CPU): learning, resume, atomic checkpoints, bad input, loss accounting, peft export."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from phi3 import load_model, load_tokenizer
from phi3.data import make_batches, pad_token_for, read_jsonl
from phi3.lora import LoRAConfig, add_lora, load_adapter, lora_modules, mark_only_lora_as_trainable
from tiny import save_hf, transformers_or_skip

REPO = Path(__file__).parent.parent
CHAT = REPO / "examples" / "chat.jsonl"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A random tiny Phi-3 (GQA) checkpoint written by transformers, with the real tokenizer files."""
    folder = tmp_path_factory.mktemp("base")
    save_hf("gqa", folder, seed=3)
    for f in (REPO / "assets" / "tokenizer").iterdir():
        shutil.copy(f, folder / f.name)
    return folder


@pytest.fixture(scope="module")
def small_chat(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "chat.jsonl"
    path.write_text("".join(CHAT.read_text().splitlines(keepends=True)[:48]))
    return path


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
        assert {"adapter_config.json", "adapter_model.safetensors", "state.pt", "trainable.safetensors"} <= {
            p.name for p in ckpt.iterdir()}
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
    ckpt = train.find_checkpoint(out)
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
        torch.testing.assert_close(g_four[n], g_one[n], rtol=1e-4, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_gradients(base, lora_model):
    batch = batches_of(base, 3, 3)
    results = []
    for checkpointing in (False, True):
        lora_model.gradient_checkpointing = checkpointing
        lora_model.zero_grad()
        torch.manual_seed(11)  # same dropout masks; checkpoint replays the RNG on recompute
        results.append((train.accumulate_gradients(lora_model, batch, "cpu", no_autocast), grads(lora_model)))
    (l0, g0), (l1, g1) = results
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


def test_torchrun_two_processes_train_like_one_with_double_accumulation(base, small_chat, tmp_path):
    """2 processes x --grad-accum 1 == 1 process x --grad-accum 2: same data, token-weighted loss, summed grads."""
    common = ["--data", str(small_chat), "--model", str(base), "--max-steps", "4", "--batch-size", "2",
              "--dropout", "0", "--lr", "1e-2", "--eval-fraction", "0.2", "--log-every", "1", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(REPO / "train.py"), *common, "--out", str(tmp_path / "two")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert run(*common, "--grad-accum", 2, "--out", tmp_path / "one") == 0
    a = load_file(tmp_path / "one" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)
    one_rows, two_rows = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert len(one_rows) == len(two_rows)
    for r1, r2 in zip(one_rows, two_rows):
        key = "loss" if "loss" in r1 else "eval_loss"
        assert r1["step"] == r2["step"] and r2[key] == pytest.approx(r1[key], rel=1e-5)


@pytest.mark.parametrize("flags,message", [
    (["--rank", "0"], "--rank must be > 0"),
    (["--targets", "attn"], "unknown LoRA target 'attn'"),
    (["--dropout", "1.5"], "--dropout must be in [0, 1)"),
])
def test_impossible_flags_exit_2_before_loading(small_chat, tmp_path, capsys, flags, message):
    assert run("--data", small_chat, "--out", tmp_path / "o", *flags) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "o").exists()


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
