"""phi3/kernel_tuning.py's on-disk cache of kernel choices: where it lives, what invalidates it, and that a broken or
unwritable cache costs a warning, never the run. GPU (`pytest -m cuda`): a second run on the same GPU times nothing."""
import importlib
import json

import pytest
import torch

from phi3.kernels.tuning import use_tuning_record
from phi3 import kernel_tuning

ll = importlib.import_module("phi3.kernels.lora_linear")
launch = importlib.import_module("phi3.kernels.launch")
KIND_KEY = "fwd M_BUCKET=8192 N=9216 K=3072 R=16 DROPOUT=False dtype=torch.bfloat16"
RECORD = {"version": 2, "kinds": {KIND_KEY: "tma"}, "configs": {}}
COMPILED = []  # the calls of kernel_tuning.compile_run_kernels (faked)
SHIPPED = kernel_tuning.SHIPPED  # the repository's files (tests see none unless they ship their own)


@pytest.fixture(autouse=True)
def fresh_choices(monkeypatch, tmp_path):
    """Each test starts with no kernel choices in the process and its own cache folder; compiling ahead (GPU only)
    is faked: it is recorded."""
    monkeypatch.setattr(ll, "_chosen_kinds", {})
    monkeypatch.setattr(launch, "_best", {})
    monkeypatch.setenv("PHI3_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(kernel_tuning, "SHIPPED", tmp_path / "nothing-shipped")  # (the faked GPUs are Hoppers)
    monkeypatch.setattr(kernel_tuning, "compile_run_kernels", lambda *args, **kwargs: COMPILED.append(args))
    COMPILED.clear()
    for name in kernel_tuning.SETTINGS:
        monkeypatch.delenv(name, raising=False)


def test_the_cache_file_is_per_gpu_model_and_settings(monkeypatch, tmp_path):
    h200 = kernel_tuning.cache_file("NVIDIA H200", (9, 0))
    assert h200.parent == tmp_path / "cache" and h200 == kernel_tuning.cache_file("NVIDIA H200", (9, 0))
    assert kernel_tuning.cache_file("NVIDIA A100-SXM4-80GB", (8, 0)) != h200
    monkeypatch.setenv("LORA_GEMM", "cublas")
    assert kernel_tuning.cache_file("NVIDIA H200", (9, 0)) != h200
    monkeypatch.setenv("PHI3_KERNEL_CACHE", "off")
    assert kernel_tuning.cache_file("NVIDIA H200", (9, 0)) is None


def test_a_written_cache_is_read_back_and_applied(tmp_path):
    path = kernel_tuning.cache_file("NVIDIA H200", (9, 0))
    kernel_tuning.write_cache(path, RECORD, log=pytest.fail)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left
    assert kernel_tuning.read_cache(path, log=pytest.fail) == RECORD
    assert ll._chosen_kinds == {KIND_KEY: "tma"}  # later launches take it without timing


@pytest.mark.parametrize("content", ["[1", "[1, 2]", '{"settings": {}, "record": {}}', b"\xff\xfe{",
                                     json.dumps({"settings": {"LORA_GEMM": "", "LORA_AUTOTUNE": ""},
                                                 "record": {"version": 2, "kinds": {KIND_KEY: "rm -rf"}}}),
                                     json.dumps({"settings": {"LORA_GEMM": "cublas", "LORA_AUTOTUNE": ""},
                                                 "record": RECORD})])
def test_a_broken_cache_is_a_warning_and_ignored(tmp_path, content):
    path = kernel_tuning.cache_file("NVIDIA H200", (9, 0))
    path.parent.mkdir(parents=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    said = []
    assert kernel_tuning.read_cache(path, log=said.append) is None
    assert len(said) == 1 and said[0].startswith(f"warning: {path}: ") and "ignoring the kernel cache" in said[0]
    assert ll._chosen_kinds == {} and launch._best == {}  # nothing of it applied


def test_an_unwritable_cache_is_a_warning(tmp_path, monkeypatch):
    (tmp_path / "blocked").write_text("a file where the cache folder would be")
    monkeypatch.setenv("PHI3_KERNEL_CACHE", str(tmp_path / "blocked" / "cache"))
    said = []
    kernel_tuning.write_cache(kernel_tuning.cache_file("NVIDIA H200", (9, 0)), RECORD, log=said.append)
    assert len(said) == 1 and "cannot keep kernel choices" in said[0] and "PHI3_KERNEL_CACHE" in said[0]


def test_prepare_keeps_choices_for_the_next_run_and_a_resumed_record_wins(monkeypatch, tmp_path):
    """prepare()'s GPU flow with the GPU faked: the first run writes its choices to the cache, a new process reads
    them before tuning (which then finds them made), and a resumed run's own record overrides the cache's."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    seen_by_tuning = []

    def tune(model, max_tokens, dtype):  # stands in for timing: records what was already chosen, chooses "tma"
        seen_by_tuning.append(dict(ll._chosen_kinds))
        ll._chosen_kinds.setdefault(KIND_KEY, "tma")
    monkeypatch.setattr(kernel_tuning, "tune_lora_layers", tune)
    cuda = torch.device("cuda")
    said = []
    first = kernel_tuning.prepare(None, 8192, torch.bfloat16, cuda, None, log=said.append)
    assert first["kinds"] == {KIND_KEY: "tma"} and seen_by_tuning == [{}]
    assert said[0].startswith("kernel choices: 0 already made (cache), 1 timed now in "), said
    assert kernel_tuning.read_cache(kernel_tuning.cache_file("NVIDIA H200", (9, 0)), pytest.fail) == first
    monkeypatch.setattr(ll, "_chosen_kinds", {})  # a new process
    said.clear()
    assert kernel_tuning.prepare(None, 8192, torch.bfloat16, cuda, None, log=said.append) == first
    assert said[0].startswith("kernel choices: 1 already made (cache), 0 timed now in "), said
    assert seen_by_tuning[-1] == {KIND_KEY: "tma"}  # the cache's choice was in place before tuning
    monkeypatch.setattr(ll, "_chosen_kinds", {})
    resumed = {"version": 2, "kinds": {KIND_KEY: "cublas"}, "configs": {}}
    assert kernel_tuning.prepare(None, 8192, torch.bfloat16, cuda, resumed, log=lambda text: None)["kinds"] == {
        KIND_KEY: "cublas"}  # the run's own choice, not the cache's
    # and the cache now holds that choice for later runs (the last run's choices are kept)
    assert kernel_tuning.read_cache(kernel_tuning.cache_file("NVIDIA H200", (9, 0)), pytest.fail)["kinds"] == {
        KIND_KEY: "cublas"}


def test_a_resumed_record_of_older_kernels_is_replaced_with_a_note(monkeypatch):
    """A run folder from before a kernel change (record version 1: a removed GEMM kind, other key fields) resumes:
    its choices are made anew, with a note saying the rounding may differ; a damaged record still stops the run."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(kernel_tuning, "tune_lora_layers",
                        lambda model, max_tokens, dtype: ll._chosen_kinds.setdefault(KIND_KEY, "tma"))
    old = {"version": 1, "kinds": {"fwd SPARE=True " + KIND_KEY[4:]: "concat"}, "configs": {}}
    said = []
    record = kernel_tuning.prepare(None, 8192, torch.bfloat16, torch.device("cuda"), old, log=said.append)
    assert record["kinds"] == {KIND_KEY: "tma"} and record["version"] == 2
    assert "record version 1" in said[0] and "choosing anew" in said[0]
    with pytest.raises(ValueError, match="version 3 is not 2"):
        kernel_tuning.prepare(None, 8192, torch.bfloat16, torch.device("cuda"), {"version": 3}, log=said.append)


class NoNewChoices(dict):
    def __setitem__(self, key, value):
        raise AssertionError(f"timed again although the cache had every choice: {key}")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (`pytest -m cuda`)")
def test_a_second_run_on_the_same_gpu_times_nothing(monkeypatch):
    from test_offload import lora_model
    model = lora_model("cuda", torch.bfloat16, layers=2, hidden=1024, heads=8)
    device = torch.device("cuda")
    first = kernel_tuning.prepare(model, 8192, torch.bfloat16, device, None, log=lambda text: None)
    assert first["kinds"] and first["configs"]  # something was timed and kept
    monkeypatch.setattr(ll, "_chosen_kinds", NoNewChoices())  # a new process: no choices, and none may be timed
    monkeypatch.setattr(launch, "_best", NoNewChoices())
    said = []
    second = kernel_tuning.prepare(model, 8192, torch.bfloat16, device, None, log=said.append)
    assert second == first and ", 0 timed now in " in said[0], said



@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (`pytest -m cuda`)")
def test_after_prepare_training_and_eval_past_the_mlp_tile_time_nothing(monkeypatch):
    """The choices prepare makes are all a run needs, also when the MLP cuts a micro-batch into tiles."""
    from phi3.model import MLP
    from test_offload import lora_model
    monkeypatch.setattr(MLP, "tile_tokens", 4096)
    model = lora_model("cuda", torch.bfloat16, layers=2, hidden=1024, heads=8)
    ids = torch.randint(0, 512, (3, 3000), device="cuda")  # 9000 tokens: MLP tiles of 4096, 4096 and 808
    kernel_tuning.prepare(model, {"train": [ids.numel()], "eval": [ids.numel()]}, torch.bfloat16,
                          torch.device("cuda"), None)
    monkeypatch.setattr(ll, "_chosen_kinds", NoNewChoices(ll._chosen_kinds))
    monkeypatch.setattr(launch, "_best", NoNewChoices(launch._best))
    model(ids).float().square().mean().backward()
    with torch.no_grad():
        model.eval()(ids)

def test_only_the_buckets_the_run_reaches_are_tuned():
    # 100: below the tuned sizes; 3000 and 4096 share the 4096 bucket, 5000 and 8192 the 8192 one; 9000 -> 16384
    assert kernel_tuning.reached_buckets([100, 2048, 3000, 4096, 5000, 8192, 9000]) == [2048, 4096, 8192, 9000]
    assert kernel_tuning.reached_buckets([]) == []


def test_train_py_hands_the_token_counts_of_every_micro_batch(monkeypatch, tmp_path):
    """train.py tunes for the micro-batches of all the epochs it will run and of its eval set, nothing else."""
    import train
    from phi3 import load_tokenizer
    from phi3.data import make_batches, pad_token_for, read_jsonl, split_eval
    from test_train import CHAT, REPO  # noqa: F401  (the demo data and the repository)
    seen = {}

    def prepare(model, token_counts, *args, **kwargs):
        seen.update(token_counts())
        return {}
    monkeypatch.setattr(train.kernel_tuning, "prepare", prepare)
    model = REPO / "models" / "tiny-phi3"
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(CHAT.read_text().splitlines(keepends=True)[:60]))
    assert train.main(["--data", str(data), "--model", str(model), "--out", str(tmp_path / "o"), "--max-steps", "10",
                       "--batch-size", "8", "--eval-fraction", "0.1", "--save-every", "0"]) == 0
    tok = load_tokenizer(model)
    examples, _ = read_jsonl(data, tok, "assistant", 2048)
    examples, held_out = split_eval(examples, 0.1, 0)
    batches = lambda epoch: make_batches(examples, 8, 2048, pad_token_for(tok), False, shuffle=True, seed=0,
                                         epoch=epoch)
    epochs = -(-10 // len(batches(0)))
    assert epochs >= 2  # the test covers more than one epoch's shuffle
    assert seen["train"] == {b.input_ids.numel() for e in range(epochs) for b in batches(e)}
    assert seen["eval"] == {b.input_ids.numel() for b in make_batches(held_out, 8, 2048, pad_token_for(tok), False,
                                                                      shuffle=False, seed=0)}


def test_mlp_layers_are_tuned_for_the_tiles_they_see():
    """Past MLP.tile_tokens the MLP runs in tiles under checkpointing and in eval: its LoRA layers are called with
    a tile's tokens and the remainder, never the whole count; attention's layers see the whole count."""
    from phi3.model import MLP
    tile = MLP.tile_tokens
    model = torch.nn.Module()
    model.gradient_checkpointing, model.checkpoint_layers = True, None
    counts = [1000, 3 * tile + 5, 2 * tile]
    mlp, attn = "model.layers.0.mlp.gate_up_proj", "model.layers.0.self_attn.qkv_proj"
    assert kernel_tuning.counts_seen(model, attn, counts, training=True) == set(counts)
    assert kernel_tuning.counts_seen(model, mlp, counts, training=True) == {1000, tile, 5}
    assert kernel_tuning.counts_seen(model, mlp, counts, training=False) == {1000, tile, 5}
    model.checkpoint_layers = 4  # the layers past the 4th keep their activations: whole micro-batches
    assert kernel_tuning.counts_seen(model, mlp, counts, training=True) == {1000, tile, 5, 3 * tile + 5, 2 * tile}
    model.gradient_checkpointing = False
    assert kernel_tuning.counts_seen(model, mlp, counts, training=True) == set(counts)
    assert kernel_tuning.counts_seen(model, mlp, counts, training=False) == {1000, tile, 5}


def fake_h200(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(kernel_tuning, "tune_lora_layers", lambda model, counts, dtype: None)  # times nothing


def ship(monkeypatch, tmp_path, record, kernels=None):
    """A shipped choices file for "NVIDIA H200" in a folder of this test's own."""
    monkeypatch.setattr(kernel_tuning, "SHIPPED", tmp_path / "shipped")
    path = kernel_tuning.shipped_file("NVIDIA H200")
    path.parent.mkdir()
    text = kernel_tuning.shipped_text("NVIDIA H200", (9, 0), record)
    if kernels:
        text = text.replace(kernel_tuning.choices_source(), kernels)
    path.write_text(text)
    return path


def test_shipped_choices_apply_under_the_cache_and_the_resumed_run(monkeypatch, tmp_path):
    """A fresh machine takes the repository's choices for its GPU model; a cache made on this machine overrides
    them key by key, a resumed run's record overrides both."""
    fake_h200(monkeypatch)
    other_key = KIND_KEY.replace("N=9216", "N=3072")
    ship(monkeypatch, tmp_path, {"version": 2, "kinds": {KIND_KEY: "cublas", other_key: "cublas"}, "configs": {}})
    said = []
    record = kernel_tuning.prepare(None, 8192, torch.bfloat16, torch.device("cuda"), None, log=said.append)
    assert record["kinds"] == {KIND_KEY: "cublas", other_key: "cublas"}
    assert said[0].startswith("kernel choices: 2 already made (cache and shipped choices for NVIDIA H200), 0 timed")
    assert COMPILED, "kernels are compiled ahead before tuning"
    cache = kernel_tuning.cache_file("NVIDIA H200", (9, 0))
    kernel_tuning.write_cache(cache, {"version": 2, "kinds": {KIND_KEY: "tma"}, "configs": {}}, pytest.fail)
    monkeypatch.setattr(ll, "_chosen_kinds", {})  # a new process
    record = kernel_tuning.prepare(None, 8192, torch.bfloat16, torch.device("cuda"), None, log=lambda text: None)
    assert record["kinds"] == {KIND_KEY: "tma", other_key: "cublas"}  # this machine's own choice wins
    monkeypatch.setattr(ll, "_chosen_kinds", {})
    resumed = {"version": 2, "kinds": {other_key: "tma"}, "configs": {}}
    record = kernel_tuning.prepare(None, 8192, torch.bfloat16, torch.device("cuda"), resumed, log=lambda text: None)
    assert record["kinds"][other_key] == "tma"


def test_a_gpu_without_its_own_file_takes_one_of_its_architecture(monkeypatch, tmp_path):
    """No file for this GPU model: one made on a GPU of the same compute capability applies (and the log says so);
    a file of its own, once there, wins over it."""
    fake_h200(monkeypatch)
    ship(monkeypatch, tmp_path, RECORD)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GH200 480GB")
    said = []
    record = kernel_tuning.prepare(None, 8192, torch.bfloat16, torch.device("cuda"), None, log=said.append)
    assert record["kinds"] == RECORD["kinds"]
    assert said[0].startswith("kernel choices: 1 already made (cache and shipped choices made on NVIDIA H200, a GPU "
                              "of the same architecture; bench/make_kernel_choices.py makes this GPU's own)")
    own = {"version": 2, "kinds": {KIND_KEY: "tma" if RECORD["kinds"][KIND_KEY] == "cublas" else "cublas"},
           "configs": {}}
    kernel_tuning.shipped_file("NVIDIA GH200 480GB").write_text(
        kernel_tuning.shipped_text("NVIDIA GH200 480GB", (9, 0), own))
    monkeypatch.setattr(ll, "_chosen_kinds", {})  # a new process
    monkeypatch.setenv("PHI3_KERNEL_CACHE", str(tmp_path / "other-machine"))
    said = []
    record = kernel_tuning.prepare(None, 8192, torch.bfloat16, torch.device("cuda"), None, log=said.append)
    assert record["kinds"] == own["kinds"] and "shipped choices for NVIDIA GH200 480GB)" in said[0]


@pytest.mark.parametrize("why", ["stale", "switched off", "cache off", "other settings", "other architecture",
                                 "misnamed", "damaged"])
def test_shipped_choices_not_taken(monkeypatch, tmp_path, why):
    """Choices made for other kernels (said once), switched off, for other kernel settings or a GPU of another
    architecture, a file whose name is not its GPU's, or a damaged file (a warning) are not used: the run times its
    own."""
    fake_h200(monkeypatch)
    ship(monkeypatch, tmp_path, RECORD, kernels="0" * 64 if why == "stale" else None)
    if why == "switched off":
        monkeypatch.setenv("PHI3_SHIPPED_CHOICES", "off")
    elif why == "cache off":
        monkeypatch.setenv("PHI3_KERNEL_CACHE", "off")
    elif why == "other settings":
        monkeypatch.setenv("LORA_GEMM", "cublas")
    elif why == "other architecture":
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    elif why == "misnamed":  # says it is another GPU's: which GPU's it is cannot be known
        path = kernel_tuning.shipped_file("NVIDIA H200")
        path.write_text(path.read_text().replace('"device": "NVIDIA H200"', '"device": "NVIDIA H100 80GB HBM3"'))
    elif why == "damaged":
        path = kernel_tuning.shipped_file("NVIDIA H200")
        path.write_text(path.read_text().replace('"tma"', '"rm -rf /"'))
    said = []
    record = kernel_tuning.prepare(None, 8192, torch.bfloat16, torch.device("cuda"), None, log=said.append)
    assert record["kinds"] == {}
    notes = [text for text in said if "made for other kernels" in text]
    assert len(notes) == (why == "stale") and all("bench/make_kernel_choices.py" in text for text in notes)
    warnings = [text for text in said if text.startswith("warning: ")]
    assert len(warnings) == (why == "damaged") and all("ignoring the shipped kernel choices" in t for t in warnings)


def test_the_shipped_choices_are_valid_and_made_for_these_kernels(fresh_choices):
    """Every file in phi3/kernel_choices/ is a record this code accepts, for its GPU model, made for the current
    timed kernels and configs (a file made for older ones would be skipped, and a fresh machine would time again)."""
    files = sorted(SHIPPED.glob("*.json"))
    assert files, f"no shipped kernel choices in {SHIPPED}"
    for path in files:
        data = json.loads(path.read_text())
        assert path.name == kernel_tuning.shipped_file(data["device"]).name
        use_tuning_record(data["record"])
        assert data["record"]["kinds"] and data["record"]["configs"]
        assert data["kernels"] == kernel_tuning.choices_source(), (
            f"the timed kernels or their configs changed since {path.name} was made: run "
            f"`python3 bench/make_kernel_choices.py` on a "
            f"{data['device']} and commit the file it writes")


def test_the_stand_in_has_the_run_shapes_and_draws_nothing():
    """start_compiling's stand-in (two decoder layers) has every LoRA shape of the whole model, and building it leaves
    the random stream as it was (the run's own LoRA init draws next)."""
    from phi3 import Phi3Config, Phi3ForCausalLM
    from phi3.lora import LoRAConfig, add_lora, lora_modules
    config = Phi3Config(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                        num_key_value_heads=2)
    lora = LoRAConfig(rank=4, alpha=8, dropout=0.1)
    full = add_lora(Phi3ForCausalLM(config), lora)
    state = torch.random.get_rng_state()
    one = kernel_tuning.stand_in(config, lora, torch.device("cpu"), torch.bfloat16, True, 2)
    assert torch.equal(torch.random.get_rng_state(), state)
    shapes = lambda model: {(m.in_features, m.out_features, m.rank, tuple(m.slices), m.dropout, m.weight.dtype)
                            for m in lora_modules(model).values()}
    assert shapes(one) == {shape[:-1] + (torch.bfloat16,) for shape in shapes(full)}
    assert len(one.model.layers) == 2 and one.gradient_checkpointing and one.checkpoint_layers == 2


def test_steps_ahead_run_one_length_per_class_of_micro_batch():
    """Triton specializes on an int being a multiple of 16 (or 1); the LoRA kernels run one config per tuned bucket
    and a fixed one below it: one length of each class the run has, the largest, and nothing the run never runs."""
    lengths = kernel_tuning.step_lengths([8192, 8192, 8000, 6000, 4100, 1024, 512, 1000, 1, 2048])
    assert lengths == [1, 1000, 1024, 2048, 4100, 8192]
    assert kernel_tuning.step_lengths([8192] * 20) == [8192]  # packed: every micro-batch alike
    assert kernel_tuning.step_lengths([]) == []
