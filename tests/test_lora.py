"""LoRA on the model: identity at init, merge, trainable set, PEFT file exchange with peft + transformers."""

import copy
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from phi3 import CheckpointError, load_model, save_model
from phi3.lora import (LoRAConfig, LoRALinear, adapter_base_model, add_lora, load_adapter, lora_modules,
                       lora_state_dict, mark_only_lora_as_trainable, merge_lora, parse_targets, save_adapter,
                       unmerge_lora)
from phi3.patterns import Patterns
from test_model import assert_as_accurate
from tiny import save_hf, transformers_or_skip


def randomize_lora(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * 0.05)


def lora_model(tmp_path, name="gqa", dtype=torch.float32, **cfg):
    save_hf(name, tmp_path / "base")
    model = load_model(tmp_path / "base", dtype=dtype)
    add_lora(model, LoRAConfig(**{"rank": 4, "alpha": 8, "dropout": 0.0, **cfg}))
    return model


IDS = torch.randint(0, 32000, (2, 11), generator=torch.Generator().manual_seed(0))
EPS32 = torch.finfo(torch.float32).eps  # 2 * unit roundoff: one fp32 rounding moves a value v by at most EPS32/2 * |v|


def delta_size(m: LoRALinear) -> torch.Tensor:
    """|scale| |B| |A| elementwise: bounds |delta| and the sizes its fp32 sum over the rank adds."""
    return abs(m.scale) * (m.full_B().abs().float() @ m.lora_A.abs().float())


def in_float64(model):
    """The same model (weights and LoRA) in float64: the exact result fp32 answers are judged against."""
    return copy.deepcopy(model).double()


def test_zero_init_lora_leaves_logits_unchanged(tmp_path):
    save_hf("gqa", tmp_path / "base")
    base = load_model(tmp_path / "base")
    model = add_lora(load_model(tmp_path / "base"), LoRAConfig(rank=8, targets=("qkv", "o", "gate_up", "down", "lm_head")))
    assert len(lora_modules(model)) == 2 * 4 + 1
    assert all(m.lora_A.abs().sum() > 0 and m.lora_B.abs().sum() == 0 for m in lora_modules(model).values())
    with torch.no_grad():
        # B = 0 makes the LoRA term exactly 0, and x W^T + 0 == x W^T in IEEE arithmetic: each layer is exact.
        for m in lora_modules(model).values():
            x = torch.randn(3, m.in_features)
            assert torch.equal(m(x), x @ m.weight.t())
        # the model as a whole: each LoRA layer holds the base layer's own contiguous W, so the same BLAS calls
        torch.testing.assert_close(model(IDS), base(IDS), rtol=0, atol=0)


def test_lora_weight_is_the_base_weight_and_saves_plainly(tmp_path):
    """LoRALinear keeps the base layer's own W (no copy: a 14B model has no room for a second one), frozen, saved
    under the checkpoint's names, merged in place."""
    from phi3.checkpoint import base_state_dict
    save_hf("gqa", tmp_path / "base")
    base = load_model(tmp_path / "base")
    model = load_model(tmp_path / "base")
    weights = {name: module.weight for name, module in model.named_modules() if hasattr(module, "weight")}
    model = add_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.0, targets=("q", "v", "o")))
    for name, m in lora_modules(model).items():
        assert m.weight is weights[name] and m.weight.is_contiguous() and not m.weight.requires_grad
        assert torch.equal(m.weight, base.get_submodule(name).weight)
    state = base_state_dict(model)
    assert all(t.is_contiguous() for t in state.values())
    assert state.keys() == base_state_dict(base).keys()
    randomize_lora(model)
    m = lora_modules(model)["model.layers.0.self_attn.o_proj"]
    expected = m.weight + m.delta()
    bound = EPS32 * (m.weight.abs() + delta_size(m))  # merge does this same fp32 add; a BLAS that sums delta's
    m.merge()                                         # product in another order moves it by less than this
    assert ((m.weight - expected).abs() <= bound).all()
    assert m.weight is weights["model.layers.0.self_attn.o_proj"]  # merged in place


@pytest.mark.parametrize("targets", [("qkv", "o", "gate_up", "down"), ("q", "v"), ("k", "up", "o")])
def test_merge_and_unmerge_agree(tmp_path, targets):
    model = lora_model(tmp_path, targets=targets)
    randomize_lora(model)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    bounds = {f"{n}.weight": 2 * EPS32 * (m.weight.abs() + delta_size(m)) for n, m in lora_modules(model).items()}
    with torch.no_grad():
        exact = in_float64(model)(IDS)
        unmerged = model(IDS)
        merge_lora(model)
        merged = model(IDS)
        unmerge_lora(model)
        again = model(IDS)
    assert not any(m.merged for m in lora_modules(model.eval()).values())  # eval() does not merge
    assert_as_accurate(merged, unmerged, exact)  # x (W + s B A)^T: the same function, as accurate as the LoRA path
    assert_as_accurate(again, unmerged, exact)
    for n, p in model.state_dict().items():
        if n in bounds:  # (W + delta) - delta: two fp32 roundings of values of size |W| + |delta|
            assert ((p - before[n]).abs() <= bounds[n]).all(), n
        else:
            assert torch.equal(p, before[n]), n


def test_per_slice_targets_touch_only_their_rows(tmp_path):
    model = lora_model(tmp_path, targets=("q", "v"))  # GQA: q is 64 rows, k and v 32 each
    randomize_lora(model)
    layer = model.model.layers[0].self_attn.qkv_proj
    assert isinstance(layer, LoRALinear) and layer.slices == [(0, 64), (96, 128)]
    delta = layer.delta()
    assert delta[:64].abs().sum() > 0
    assert delta[64:96].abs().max() == 0 and delta[96:].abs().sum() > 0


def test_only_lora_parameters_train(tmp_path):
    model = lora_model(tmp_path, targets=("q", "v", "o", "gate_up", "down"), dropout=0.1).train()
    mark_only_lora_as_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state_dict(model)) and trainable
    base = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora_before = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(IDS).float().logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        if n in base:
            assert p.grad is None and torch.equal(p, base[n]), n
        else:
            assert not torch.equal(p, lora_before[n]), n


def test_lora_parameters_stay_fp32_on_a_bf16_base(tmp_path):
    model = lora_model(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in lora_state_dict(model).values())
    assert model.model.layers[0].self_attn.qkv_proj.weight.dtype == torch.bfloat16
    assert model(IDS).dtype == torch.bfloat16


def test_rslora_scale():
    assert LoRAConfig(rank=16, alpha=32).scale == 2.0
    assert LoRAConfig(rank=16, alpha=32, rslora=True).scale == 8.0
    assert parse_targets("qkv_proj, o,all-linear") == ("qkv", "o", "gate_up", "down")
    with pytest.raises(ValueError, match="unknown LoRA target 'attn'"):
        parse_targets("attn")


@pytest.mark.parametrize("targets", [("qkv", "o", "gate_up", "down"), ("q", "v", "down")])
def test_adapter_round_trip_is_exact(tmp_path, targets):
    model = lora_model(tmp_path, targets=targets, rslora=True)
    randomize_lora(model)
    save_adapter(model, tmp_path / "adapter", base_model=tmp_path / "base")
    again = load_adapter(load_model(tmp_path / "base"), tmp_path / "adapter")
    with torch.no_grad():
        # same A and (block-diagonal) B bit for bit; the scale, exported as alpha = scale * sqrt(n r), may come back
        # one rounding off: as accurate as the original against float64
        assert_as_accurate(again(IDS), model(IDS), in_float64(model)(IDS))
    save_adapter(again, tmp_path / "adapter2")
    a = (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()
    assert a == (tmp_path / "adapter2" / "adapter_model.safetensors").read_bytes()


@pytest.mark.parametrize("targets", [("qkv", "o", "gate_up", "down", "lm_head"), ("q", "v"), ("q", "v", "o")])
def test_our_adapter_loads_in_peft_with_equal_logits(tmp_path, targets):
    transformers = transformers_or_skip()
    peft = pytest.importorskip("peft", reason="peft is the reference oracle; pip install peft")
    model = lora_model(tmp_path, targets=targets)
    randomize_lora(model)
    save_adapter(model, tmp_path / "adapter", base_model=tmp_path / "base")
    hf = transformers.Phi3ForCausalLM.from_pretrained(tmp_path / "base")
    hf = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        ref = hf(IDS).logits
        assert_as_accurate(model(IDS), ref, hf.double()(IDS).logits)


def test_peft_trained_adapter_loads_here_with_equal_logits(tmp_path):
    transformers = transformers_or_skip()
    peft = pytest.importorskip("peft", reason="peft is the reference oracle; pip install peft")
    save_hf("gqa", tmp_path / "base")
    hf = transformers.Phi3ForCausalLM.from_pretrained(tmp_path / "base")
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["qkv_proj", "down_proj"], lora_dropout=0.0,
                             rank_pattern={"down_proj": 2}, alpha_pattern={"down_proj": 3}, init_lora_weights=False)
    hf = peft.get_peft_model(hf, config).eval()  # init_lora_weights=False: random non-zero B
    hf.save_pretrained(tmp_path / "peft_adapter")
    assert json.loads((tmp_path / "peft_adapter" / "adapter_config.json").read_text())["r"] == 4
    model = load_adapter(load_model(tmp_path / "base"), tmp_path / "peft_adapter")
    assert model.model.layers[0].mlp.down_proj.rank == 2
    with torch.no_grad():
        ref = hf(IDS).logits
        assert_as_accurate(model(IDS), ref, hf.double()(IDS).logits)


# ---- adapters from strangers: one CheckpointError line for any bad value, the model left untouched ----------------

@pytest.fixture
def adapter(tmp_path):
    """A per-slice adapter (q, v inside qkv_proj: rank 8 there, 4 on o_proj, so rank_pattern is used) on 'gqa'."""
    model = lora_model(tmp_path, targets=("q", "v", "o"))
    randomize_lora(model)
    return save_adapter(model, tmp_path / "adapter", base_model=tmp_path / "base")


def edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), **changes)))
    return path


def edit_tensors(folder, change):
    path = folder / "adapter_model.safetensors"
    tensors = change(load_file(path))
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, path)
    return path


def assert_refused(tmp_path, adapter, match: str, file: str = "adapter_config.json", dtype=torch.float32):
    """load_adapter raises one CheckpointError line naming `file`, and the model is left as it was."""
    model = load_model(tmp_path / "base", dtype=dtype)
    with pytest.raises(CheckpointError, match=match) as e:
        load_adapter(model, adapter)
    message = str(e.value)
    assert message.startswith(str(adapter / file)) and "\n" not in message, message
    assert not lora_modules(model)


NAN, INF = float("nan"), float("inf")
BAD_CONFIG = {  # adapter_config.json key -> values of a wrong type or out of range, one case each
    "r": [0, -1, "8", True, 8.0, None], "lora_alpha": ["16", NAN, INF, True, None, 10**400],
    "lora_dropout": [1.0, -0.1, "0", NAN], "use_rslora": ["true", 1], "target_modules": [5, [1], {"q": 1}],
    "base_model_name_or_path": [5, ["x"]], "rank_pattern": [[], "x", {"x": 0}, {"x": "4"}, {"x": True}, {"x": 2.5}],
    "alpha_pattern": [[1], {"x": "a"}, {"x": NAN}, {"x": None}], "peft_type": ["IA3", 5, None],
    "use_dora": ["no", 1], "ensure_weight_tying": ["yes"],
    "trainable_token_indices": [[], [1, 1], [-1], ["5"], [2.0], {}, {"embed_tokens": []}, {"embed_tokens": 5}, 7],
    "bias": ["all", None], "modules_to_save": [["lm_head"], "lm_head"], "fan_in_fan_out": ["no"], "lora_bias": [True],
}


@pytest.mark.parametrize("key,value", [(k, v) for k, values in BAD_CONFIG.items() for v in values])
def test_adapter_config_with_wrong_values_names_the_key(tmp_path, adapter, key, value):
    edit_config(adapter, **{key: value})
    assert_refused(tmp_path, adapter, f"'{key}' must be")


@pytest.mark.parametrize("content,what", [
    (b"[]", "expected a JSON object"), (b"5", "expected a JSON object"), (b"{", "not valid JSON"),
    (b"[" * 100_000, "nesting too deep"), (b"\xff\xfe", "not UTF-8"),
])
def test_adapter_config_that_is_not_a_json_object(tmp_path, adapter, content, what):
    (adapter / "adapter_config.json").write_bytes(content)
    assert_refused(tmp_path, adapter, what)


QKV_A = "base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight"
QKV_B = "base_model.model.model.layers.0.self_attn.qkv_proj.lora_B.weight"


def replaced(key, make):
    return lambda tensors: dict(tensors, **{key: make(tensors[key])})


@pytest.mark.parametrize("change,what", [
    (replaced(QKV_A, lambda t: t.to(torch.int32)), "lora_A torch.int32"),
    (replaced(QKV_B, lambda t: t.to(torch.bool)), "lora_B torch.bool"),
    (replaced(QKV_B, lambda t: t.index_fill(0, torch.tensor([5]), NAN)), "NaN or infinite"),
    (replaced(QKV_A, lambda t: t.index_fill(1, torch.tensor([0]), -INF)), "NaN or infinite"),
    (replaced(QKV_A, lambda t: t.double() * 1e300), "NaN or infinite values \\(as float32\\)"),  # finite in fp64 only
    (replaced(QKV_A, lambda t: t.t()), "another model size"), (replaced(QKV_A, lambda t: t[0]), "another model size"),
    (replaced(QKV_A, lambda t: t[:0]), "another model size"), (replaced(QKV_A, lambda t: t[:4]), "another model size"),
    (replaced(QKV_B, lambda t: t[:, :4]), "another model size"),
    (lambda ts: dict(ts, **{QKV_A: torch.zeros(65, 64), QKV_B: torch.zeros(128, 65)}), "more than the layer"),
    (lambda ts: {k: v for k, v in ts.items() if k != QKV_B}, "lacks lora_A/lora_B"),
    (lambda ts: dict(ts, **{"base_model.model.model.norm.lora_A.weight": ts[QKV_A]}), "not a linear layer"),
    (lambda ts: dict(ts, **{"base_model.model.model.layers.9.mlp.down_proj.lora_A.weight": ts[QKV_A]}), "not a linear"),
    (lambda ts: dict(ts, **{"base_model.model.model.embed_tokens.weight": ts[QKV_A]}), "unexpected tensor"),
    (lambda ts: dict(ts, **{QKV_A.replace(".weight", ".default.weight"): ts[QKV_A]}), "two tensors for lora_A"),
    (lambda ts: {}, "holds no LoRA tensors"),
])
def test_adapter_tensors_that_do_not_fit(tmp_path, adapter, change, what):
    edit_tensors(adapter, change)
    assert_refused(tmp_path, adapter, what, file="adapter_model.safetensors")


@pytest.mark.parametrize("changes,what", [
    ({"r": 5}, "qkv_proj has rank 8, but adapter_config.json gives it rank 5"),  # r disagrees with the tensors
    ({"rank_pattern": {}}, "o_proj has rank 4, but adapter_config.json gives it rank 8"),  # pattern dropped
    ({"rank_pattern": {"o_proj": 4, "qkv_proj": 2}}, "qkv_proj has rank 8, but .* rank 2"),
])
def test_rank_that_disagrees_with_the_config(tmp_path, adapter, changes, what):
    edit_config(adapter, **changes)
    assert_refused(tmp_path, adapter, what, file="adapter_model.safetensors")


@pytest.mark.parametrize("alpha,dtype", [(1e300, torch.float32), (1e8, torch.float16)])
def test_alpha_that_overflows_the_model_dtype(tmp_path, adapter, alpha, dtype):
    """|scale B A| can reach alpha/8 * 8 * max|A| * max|B| ~ 1e-2 alpha (randomize_lora: |B| < 0.3, |A| < 0.13)."""
    edit_config(adapter, lora_alpha=alpha, alpha_pattern={})
    assert_refused(tmp_path, adapter, f"lora_alpha {re.escape(repr(alpha))} with .* overflows {str(dtype)[6:]}",
                   dtype=dtype)
    if dtype == torch.float16:
        load_adapter(load_model(tmp_path / "base"), adapter)  # the same adapter fits a float32 model


def test_adapter_base_model(tmp_path, adapter):
    assert adapter_base_model(adapter) == tmp_path / "base"
    edit_config(adapter, base_model_name_or_path=None)
    assert adapter_base_model(adapter) is None  # names none: the caller picks its default
    # a hub id, a folder since moved, the home of no user, a name no file system allows
    for name in ("microsoft/Phi-3-mini-4k-instruct", str(tmp_path / "moved"), "~nosuchuser/x", "a\0b"):
        path = edit_config(adapter, base_model_name_or_path=name)
        with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}: the adapter's base model .* is not a "
                                                  "local folder; pass --model"):
            adapter_base_model(adapter)
    with pytest.raises(CheckpointError, match="adapter_config.json: not found"):
        adapter_base_model(tmp_path)


# ---- rank_pattern / alpha_pattern: peft's lookup, in bounded time -------------------------------------------------

def peft_value(patterns: dict, name: str, default):
    """peft's own lookup (LoraModel._create_and_replace): the value of get_pattern_key's answer."""
    other = pytest.importorskip("peft.utils.other", reason="peft is the reference oracle; pip install peft")
    return patterns.get(other.get_pattern_key(patterns.keys(), name), default)


MODULE_NAMES = [f"model.layers.{i}.{m}" for i in (0, 1, 7, 10, 31) for m in
                ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")] + ["lm_head"]
PEFT_KEYS = [
    *MODULE_NAMES[:4], *(f"^{re.escape(n)}$" for n in MODULE_NAMES[:6]),  # exact names; save_adapter's keys
    "down_proj", "mlp.down_proj", "qkv_proj", "self_attn.o_proj", "o_proj", "proj", "lm_head", "mlp", "layers", "",
    r"layers\.\d+\.mlp\.down_proj", r"layers\.[01]\.", r"layers\.(0|1)\.self_attn\..*", r".*o_proj", r"\w+_proj",
    r"model\.layers\.1\..*", r"(gate_up|down)_proj", r"layers\.\d{1,2}\.mlp\.\w+", r"^model\.layers\.0\.", r"proj$",
    r"[^.]+_proj", "o_proj|down_proj", "q?k?v?_proj", r"\Amodel\.layers\.1\.mlp\.down_proj\Z", "(?:mlp\\.)?down_proj",
    r"layers\.1.*?proj", "DOWN_PROJ", r"layers\.3\d\.", r"layers\.[^0]\d*\.mlp", "layers.1.mlp", r".*\.1\..*",
    r"model\.layers\.(1|10)\.mlp\.gate_up_proj$", r"(\d)+\.self_attn", "x*", "a{,2}_proj", "gate_up_proj{1}",
]


@pytest.mark.parametrize("key", PEFT_KEYS)
def test_pattern_keys_match_as_in_peft(key):
    patterns = Patterns({key: 1})
    for name in MODULE_NAMES:
        assert patterns.value(name, 0) == peft_value({key: 1}, name, 0), (key, name)


def test_first_matching_key_wins_as_in_peft():
    for keys in (PEFT_KEYS, PEFT_KEYS[::-1], PEFT_KEYS[10:] + PEFT_KEYS[:10]):
        mapping = {key: i + 1 for i, key in enumerate(keys)}
        patterns = Patterns(mapping)
        assert [patterns.value(n, 0) for n in MODULE_NAMES] == [peft_value(mapping, n, 0) for n in MODULE_NAMES]


def test_pathological_keys_finish():
    """Each of these keys makes Python's re backtrack for minutes or more (it would hang this test); the NFA answers
    at once. The answers are checked: (.*a){30} needs 30 a's, (a+)+$ only a's, (.*)*z a final z."""
    p = Patterns({"(.*a){30}": 1})
    assert [p.value(n, 0) for n in ("a" * 29, "a" * 30, "b" + "a" * 40 + "b", "x.y" + "a" * 30)] == [0, 1, 0, 1]
    p = Patterns({"(a+)+$": 1})
    assert [p.value(n, 0) for n in ("a" * 40 + "!", "a" * 40, "x." + "a" * 40, "x" + "a" * 40)] == [0, 1, 1, 0]
    p = Patterns({"(.*)*z": 1, "([a-z_.0-9]+)*!": 2})
    assert [p.value(n, 0) for n in MODULE_NAMES] == [0] * len(MODULE_NAMES)
    assert p.value(MODULE_NAMES[0] + "z", 0) == 1 and p.value(MODULE_NAMES[0] + "!", 0) == 2


def test_pathological_key_in_an_adapter_loads(tmp_path, adapter):
    rank_pattern = json.loads((adapter / "adapter_config.json").read_text())["rank_pattern"]
    edit_config(adapter, rank_pattern={"(.*)*z": 3, "([a-z_.0-9]+)*!": 5, **rank_pattern})
    assert lora_modules(load_adapter(load_model(tmp_path / "base"), adapter))  # no module matches the two keys


@pytest.mark.parametrize("key,what", [
    (r"(a)\1", "escape \\\\1 is not supported"), ("(?=o_proj)", "not lookaround"), ("(?<!x)o_proj", "not lookaround"),
    ("(?i)O_PROJ", "not lookaround, flags"), ("(?P<n>o)_proj", "named groups"), ("(?>o)_proj", "(?:...) groups"),
    ("o*+_proj", "possessive"), (r"\bo_proj", "escape \\\\b is not supported"), ("a)|(b", "unbalanced parenthesis"),
    ("(o_proj", "missing \\)"), ("[o_proj", "unterminated character set"), ("*o", "nothing to repeat"),
    ("o**", "multiple repeat"), ("o{3,2}", "min repeat greater than max"), ("[z-a]", "bad character range"),
    ("o{99999999}", "repeat count too large"), ("(o{100}){200}", "too complex"), ("(" * 60 + ")" * 60, "nested"),
    ("x" * 1001, "too long"), ("\\", "bad escape"), (r"\x4", "incomplete escape"),
])
def test_pattern_keys_outside_the_subset_are_refused(tmp_path, adapter, key, what):
    edit_config(adapter, alpha_pattern={key: 2.0})
    assert_refused(tmp_path, adapter, "alpha_pattern key .*" + what)


def test_too_many_pattern_keys_to_evaluate(tmp_path, adapter):
    edit_config(adapter, rank_pattern={f"([a-z_.0-9]*){{200}}q{i}": 4 for i in range(300)})
    assert_refused(tmp_path, adapter, "rank_pattern is too large or complex to evaluate")


def test_an_adapter_loaded_into_a_model_in_eval_mode_has_no_dropout(tmp_path):
    """load_model returns a model in eval mode; the LoRA layers added to it follow it (dropout off), so two calls
    give the same logits and merging changes nothing (a LoRA layer in training mode would drop inputs at random)."""
    from phi3 import Phi3Config, Phi3ForCausalLM
    model = Phi3ForCausalLM(Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                                       pad_token_id=0)).eval()
    add_lora(model, LoRAConfig(rank=4, dropout=0.5))
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.normal_()
        ids = torch.randint(0, 64, (1, 9))
        first = model(ids)
        torch.testing.assert_close(model(ids), first, rtol=0, atol=0)
        merge_lora(model)
        torch.testing.assert_close(model(ids), first, rtol=1e-5, atol=1e-5)
    assert not any(m.training for m in lora_modules(model).values())


@pytest.mark.parametrize("name", ["phi4mini", "phi4"])
def test_phi4_geometries_exchange_adapters_with_peft_both_ways(tmp_path, name):
    """Phi-4-mini's and Phi-4's heads (128 wide, 3:1 and 4:1 grouped) with partial rotary and a 200k or 100k
    vocabulary: per-slice adapters (q, k, v, gate, up) load in peft with our logits, and peft's load here."""
    transformers = transformers_or_skip()
    peft = pytest.importorskip("peft", reason="peft is the reference oracle; pip install peft")
    model = lora_model(tmp_path, name, targets=("q", "k", "v", "o", "gate", "up", "down"))
    randomize_lora(model)
    save_adapter(model, tmp_path / "adapter", base_model=tmp_path / "base")
    hf = transformers.Phi3ForCausalLM.from_pretrained(tmp_path / "base")
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert_as_accurate(model(IDS), theirs(IDS).logits, copy.deepcopy(theirs).double()(IDS).logits)
    hf = transformers.Phi3ForCausalLM.from_pretrained(tmp_path / "base")
    trained = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                                                      target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]))
    trained.eval().save_pretrained(tmp_path / "peft_adapter")
    ours = load_adapter(load_model(tmp_path / "base"), tmp_path / "peft_adapter")
    with torch.no_grad():
        assert_as_accurate(ours(IDS), trained(IDS).logits, trained.double()(IDS).logits)


@pytest.mark.parametrize("name", ["tied", "phi4mini"])
def test_lora_on_a_tied_lm_head_as_peft_does_it(tmp_path, name):
    """A tied lm_head (the embedded tiny model, Phi-4-mini) takes an adapter as in peft: it changes the output
    projection only, the input embedding stays W. Ours loads in peft with its logits and peft's loads here; merging
    unties: lm_head gets W + s B A of its own, the embedding keeps W, and the saved model says so and loads in
    transformers with the same logits; unmerging ties again."""
    transformers = transformers_or_skip()
    peft = pytest.importorskip("peft", reason="peft is the reference oracle; pip install peft")
    model = lora_model(tmp_path, name, targets=("qkv", "lm_head"))
    randomize_lora(model)
    embedding = model.model.embed_tokens.weight.clone()
    save_adapter(model, tmp_path / "adapter", base_model=tmp_path / "base")
    theirs = peft.PeftModel.from_pretrained(transformers.Phi3ForCausalLM.from_pretrained(tmp_path / "base"),
                                            tmp_path / "adapter").eval()
    with torch.no_grad():
        unmerged = model(IDS)
        assert_as_accurate(unmerged, theirs(IDS).logits, copy.deepcopy(theirs).double()(IDS).logits)
        merge_lora(model)
        assert not model.config.tie_word_embeddings and torch.equal(model.model.embed_tokens.weight, embedding)
        assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
        save_model(model, tmp_path / "merged", tokenizer_from="assets/tokenizer")
        assert not json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"]
        merged = transformers.Phi3ForCausalLM.from_pretrained(tmp_path / "merged").eval()
        assert_as_accurate(merged(IDS).logits, model(IDS), theirs.double()(IDS).logits)
        unmerge_lora(model)
        assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
        assert_as_accurate(model(IDS), unmerged, theirs.double()(IDS).logits)  # qkv's W - delta: fp32 roundings
    hf = transformers.Phi3ForCausalLM.from_pretrained(tmp_path / "base")
    trained = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                                                      target_modules=["qkv_proj", "lm_head"]))
    trained.eval().save_pretrained(tmp_path / "peft_adapter")
    ours = load_adapter(load_model(tmp_path / "base"), tmp_path / "peft_adapter")
    with torch.no_grad():
        assert_as_accurate(ours(IDS), trained(IDS).logits, trained.double()(IDS).logits)
    # peft saves the tied layer beside the adapter (save_embedding_layers): one that is not this model's is refused
    path = tmp_path / "peft_adapter" / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("lm_head.base_layer.weight"))
    tensors[key] = tensors[key] + 1
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match="is not this model's lm_head"):
        load_adapter(load_model(tmp_path / "base"), tmp_path / "peft_adapter")
