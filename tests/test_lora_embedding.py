"""LoRA on the embedding (targets embed_tokens) and trainable token rows (add_trainable_tokens, train.py
--trainable-tokens) against peft's target_modules=["embed_tokens"] and trainable_token_indices: forward and every
gradient, the adapter files both ways, merging, tied and untied models."""
import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

import sample
from phi3 import CheckpointError, load_model, save_model
from phi3.lora import (LoRAConfig, LoRAEmbedding, TrainableTokens, adapter_modules, add_lora, add_trainable_tokens,
                       load_adapter, mark_only_lora_as_trainable, merge_lora, parse_targets, save_adapter,
                       unmerge_lora)
from peft_oracle import assert_trains_like_peft, peft_model, peft_or_skip
from test_lora import edit_config, edit_tensors
from test_model import assert_as_accurate
from tiny import save_hf

PAD = 32000  # the tiny configs' pad id: F.embedding gives its row no gradient, in peft and here
TOKENS = [5, 31999, PAD, 32063]  # 32063: past the tokenizer's ids, inside the model's vocabulary
IDS = torch.tensor([[1, 5, 900, PAD, 31999, 5, 17, 32063, 2, 400, 5], [PAD, 3, 31999, 8, 9, 10, 5, 11, 12, 13, 14]])


def base_model(tmp_path, name):
    save_hf(name, tmp_path / "base")
    for f in Path("assets/tokenizer").iterdir():
        shutil.copy(f, tmp_path / "base" / f.name)
    return load_model(tmp_path / "base")


def randomize(model, seed=0):
    """Every adapter tensor away from its start (A = 0, B = 0, rows = W's), so that every term counts."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name and not name.endswith("lora_A"):
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)


def embedding_model(tmp_path, name, targets=("qkv", "embed_tokens")):
    model = add_lora(base_model(tmp_path, name), LoRAConfig(rank=4, alpha=8, dropout=0.1, targets=targets))
    randomize(model)
    return model


def tokens_model(tmp_path, name, targets=("qkv",)):
    model = add_trainable_tokens(add_lora(base_model(tmp_path, name), LoRAConfig(rank=4, alpha=8, targets=targets)),
                                 TOKENS)
    randomize(model)
    return model


# ---- LoRA on the embedding -------------------------------------------------------------------------------------

def test_embedding_lora_starts_as_the_base_and_all_linear_leaves_it_out(tmp_path):
    """A = 0 (loralib's init): the lookup adds exactly 0. all-linear is peft's (the decoder's linears only)."""
    base = base_model(tmp_path, "gqa")
    model = add_lora(load_model(tmp_path / "base"), LoRAConfig(rank=4, targets=("embed_tokens",)))
    layer = model.model.embed_tokens
    assert isinstance(layer, LoRAEmbedding) and layer.lora_embedding_A.shape == (4, 32064)
    assert layer.lora_embedding_B.shape == (64, 4) and layer.lora_embedding_B.abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), base(IDS), rtol=0, atol=0)
    assert "embed_tokens" not in parse_targets("all-linear")
    peft = peft_or_skip()
    import transformers
    hf = peft.get_peft_model(transformers.Phi3ForCausalLM.from_pretrained(tmp_path / "base"),
                             peft.LoraConfig(target_modules="all-linear"))
    assert not any("embed_tokens" in name for name, _ in hf.named_parameters() if "lora" in name)


@pytest.mark.parametrize("name", ["gqa", "tied"])
def test_embedding_lora_forward_and_every_gradient_equal_peft(tmp_path, name):
    """On the tied model the embedding's LoRA leaves lm_head computing with W, as peft does by default."""
    model = embedding_model(tmp_path, name)
    mark_only_lora_as_trainable(model)
    theirs = peft_model(tmp_path / "base", save_adapter(model, tmp_path / "adapter")).eval()
    assert type(model.lm_head) is torch.nn.Linear
    if name == "tied":
        assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        assert_as_accurate(model.eval()(IDS), theirs(IDS).logits, copy.deepcopy(theirs).double()(IDS).logits)
    assert_trains_like_peft(model, tmp_path / "base", tmp_path, IDS)
    assert model.model.embed_tokens.lora_embedding_A.grad[:, PAD].abs().max() == 0  # padding_idx: no gradient


@pytest.mark.parametrize("name,tying", [("gqa", False), ("tied", False), ("tied", True)])
def test_peft_trained_embedding_adapter_loads_here(tmp_path, name, tying, capsys):
    """peft's own adapter (and, with ensure_weight_tying, its tied lm_head copy of the embedding's LoRA) computes
    here what it computes in peft; sample.py chats with it."""
    peft = peft_or_skip()
    import transformers
    base_model(tmp_path, name)
    hf = transformers.Phi3ForCausalLM.from_pretrained(tmp_path / "base")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "qkv_proj"], init_lora_weights=False,
                             ensure_weight_tying=tying)
    theirs = peft.get_peft_model(hf, config).eval()
    theirs.save_pretrained(tmp_path / "peft_adapter")
    ours = load_adapter(load_model(tmp_path / "base"), tmp_path / "peft_adapter")
    assert isinstance(ours.model.embed_tokens, LoRAEmbedding)
    exact = peft_model(tmp_path / "base", tmp_path / "peft_adapter").double().eval()  # (tied copies: no deepcopy)
    with torch.no_grad():
        assert_as_accurate(ours(IDS), theirs(IDS).logits, exact(IDS).logits)
    assert sample.main(["--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "peft_adapter"), "--prompt",
                        "Hi", "--max-new-tokens", "3"]) == 0, capsys.readouterr().err


def test_merging_an_embedding_lora_unties_a_tied_model(tmp_path):
    """The embedding gets W + s (B A)^T of its own, lm_head keeps W: the logits stay, the saved model says untied and
    transformers computes them from it; unmerge ties again with W exactly."""
    import transformers
    model = embedding_model(tmp_path, "tied")
    W = model.lm_head.weight.clone()
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(IDS)
        unmerged = model(IDS)
        merge_lora(model)
        assert not model.config.tie_word_embeddings and torch.equal(model.lm_head.weight, W)
        assert_as_accurate(model(IDS), unmerged, exact)
        save_model(model, tmp_path / "merged", tokenizer_from="assets/tokenizer")
        assert not json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"]
        loaded = transformers.Phi3ForCausalLM.from_pretrained(tmp_path / "merged").eval()
        assert_as_accurate(loaded(IDS).logits, unmerged, exact)
        unmerge_lora(model)
        assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
        assert torch.equal(model.lm_head.weight, W)


# ---- trainable token rows --------------------------------------------------------------------------------------

def test_trainable_tokens_start_as_the_base(tmp_path):
    """The rows start as W's: the embedding is W's lookup bit for bit; lm_head's logits of the tokens come from their
    own small product (the same sums in another order), as accurate as W's."""
    base = base_model(tmp_path, "tied")
    model = add_trainable_tokens(load_model(tmp_path / "base"), TOKENS)
    embedding, head = model.model.embed_tokens, model.lm_head
    assert isinstance(embedding, TrainableTokens) and isinstance(head, TrainableTokens) and head.source == (embedding,)
    assert [n for n, _ in model.named_parameters() if "lora_" in n] == ["model.embed_tokens.lora_token_rows"]
    with torch.no_grad():
        torch.testing.assert_close(model.hidden_states(IDS), base.hidden_states(IDS), rtol=0, atol=0)
        assert_as_accurate(model(IDS), base(IDS), copy.deepcopy(base).double()(IDS))


@pytest.mark.parametrize("name", ["tied", "gqa"])
def test_trainable_tokens_forward_and_every_gradient_equal_peft(tmp_path, name):
    """Tied: one set of rows for the embedding and lm_head (peft's list form, which it ties). Untied: the embedding's
    and lm_head's rows of the tokens, each their own (peft's {"embed_tokens": ids, "lm_head": ids})."""
    model = tokens_model(tmp_path, name)
    mark_only_lora_as_trainable(model)
    save_adapter(model, tmp_path / "adapter")
    indices = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["trainable_token_indices"]
    assert indices == (TOKENS if name == "tied" else {"embed_tokens": TOKENS, "lm_head": TOKENS})
    theirs = peft_model(tmp_path / "base", tmp_path / "adapter").eval()
    with torch.no_grad():
        assert_as_accurate(model.eval()(IDS), theirs(IDS).logits, copy.deepcopy(theirs).double()(IDS).logits)
    assert_trains_like_peft(model, tmp_path / "base", tmp_path, IDS)
    pad_grad = model.model.embed_tokens.lora_token_rows.grad[TOKENS.index(PAD)]
    assert bool(pad_grad.abs().max() == 0) is (name == "gqa")  # untied: only the lookup, which gives the pad row none


def test_peft_trained_tokens_load_here_and_in_sample_py(tmp_path, capsys):
    peft = peft_or_skip()
    import transformers
    base_model(tmp_path, "tied")
    hf = transformers.Phi3ForCausalLM.from_pretrained(tmp_path / "base")
    theirs = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj"],
                                                     trainable_token_indices=TOKENS, init_lora_weights=False)).eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "trainable_tokens_delta" in name:
                p.add_(torch.randn(p.shape))
    theirs.save_pretrained(tmp_path / "peft_adapter")
    ours = load_adapter(load_model(tmp_path / "base"), tmp_path / "peft_adapter")
    assert ours.lm_head.source == (ours.model.embed_tokens,)
    with torch.no_grad():
        assert_as_accurate(ours(IDS), theirs(IDS).logits, copy.deepcopy(theirs).double()(IDS).logits)
    assert sample.main(["--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "peft_adapter"), "--prompt",
                        "Hi", "--max-new-tokens", "3"]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("name", ["tied", "gqa"])
def test_merging_token_rows_writes_them_into_w(tmp_path, name):
    """The rows replace W's (a tied model stays tied: its lm_head uses the same rows); the logits stay; unmerge puts
    W's own rows back bit for bit."""
    model = add_trainable_tokens(base_model(tmp_path, name), TOKENS)
    randomize(model)
    before = {n: p.clone() for n, p in model.state_dict().items() if ".lora_" not in n}
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(IDS)
        unmerged = model(IDS)
        merge_lora(model)
        assert model.config.tie_word_embeddings is (name == "tied")
        rows = model.model.embed_tokens.lora_token_rows
        assert torch.equal(model.model.embed_tokens.weight[TOKENS], rows)
        assert_as_accurate(model(IDS), unmerged, exact)
        unmerge_lora(model)
        assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items() if n in before)
        torch.testing.assert_close(model(IDS), unmerged, rtol=0, atol=0)


@pytest.mark.parametrize("call,what", [
    (lambda m: add_trainable_tokens(m, []), "none given"),
    (lambda m: add_trainable_tokens(m, [5, 5]), "an id is given twice"),
    (lambda m: add_trainable_tokens(m, [32064]), "32064 is not a token id of the model"),
    (lambda m: add_trainable_tokens(m, [True]), "True is not a token id"),
    (lambda m: add_trainable_tokens(add_lora(m, LoRAConfig(targets=("embed_tokens",))), [5]),
     "do not combine"),
    (lambda m: add_trainable_tokens(add_lora(m, LoRAConfig(targets=("lm_head",))), [5]), "drop lm_head"),
    (lambda m: add_lora(add_trainable_tokens(m, [5]), LoRAConfig(targets=("lm_head",))), "already has an adapter"),
])
def test_trainable_tokens_that_cannot_work_are_refused(tmp_path, call, what):
    with pytest.raises(ValueError, match=what):
        call(base_model(tmp_path, "tied"))


# ---- files that do not fit: one CheckpointError line, the model untouched --------------------------------------

@pytest.fixture
def token_adapter(tmp_path):
    model = tokens_model(tmp_path, "tied", targets=("qkv", "o"))
    return save_adapter(model, tmp_path / "adapter", base_model=tmp_path / "base")


ROWS = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
HEAD_A, HEAD_B = "base_model.model.lm_head.lora_A.weight", "base_model.model.lm_head.lora_B.weight"


@pytest.mark.parametrize("change,what,file", [
    (lambda f: edit_config(f, trainable_token_indices=[5, 31999, PAD, 32064]), "32064 is not a token id",
     "adapter_config.json"),
    (lambda f: edit_config(f, trainable_token_indices=[5, 6]), "needs \\[2, 64\\]", "adapter_model.safetensors"),
    (lambda f: edit_config(f, trainable_token_indices=None), "holds trainable token rows of model.embed_tokens, "
     "adapter_config.json's trainable_token_indices names no layer", "adapter_model.safetensors"),
    (lambda f: edit_config(f, trainable_token_indices={"embed_tokens": TOKENS, "lm_head": [5]}),
     "lm_head its own tokens", "adapter_config.json"),
    (lambda f: edit_config(f, trainable_token_indices={"proj": TOKENS}), "key 'proj' must name the embedding",
     "adapter_config.json"),
    (lambda f: edit_tensors(f, lambda ts: dict(ts, **{ROWS: ts[ROWS] * float("inf")})), "NaN or infinite",
     "adapter_model.safetensors"),
    (lambda f: edit_tensors(f, lambda ts: dict(ts, **{
        "base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 32064),
        "base_model.model.model.embed_tokens.lora_embedding_B": torch.zeros(64, 4)})),
     "has lora_embedding_A, lora_embedding_B, trainable_tokens_delta", "adapter_model.safetensors"),
    (lambda f: edit_tensors(f, lambda ts: dict(ts, **{HEAD_A: torch.zeros(4, 64), HEAD_B: torch.zeros(32064, 4)})),
     "LoRA on lm_head with trainable tokens on this tied model", "adapter_model.safetensors"),
])
def test_token_files_that_do_not_fit_are_one_line(tmp_path, token_adapter, change, what, file):
    change(token_adapter)
    model = load_model(tmp_path / "base")
    with pytest.raises(CheckpointError, match=what) as e:
        load_adapter(model, token_adapter)
    assert str(e.value).startswith(str(token_adapter / file)) and "\n" not in str(e.value), str(e.value)
    assert not adapter_modules(model)


def test_embedding_lora_with_dora_in_a_file_is_refused(tmp_path):
    model = embedding_model(tmp_path, "gqa")
    adapter = save_adapter(model, tmp_path / "adapter")
    edit_config(adapter, use_dora=True)
    with pytest.raises(CheckpointError, match="use_dora with LoRA on the embedding .* is not supported"):
        load_adapter(load_model(tmp_path / "base"), adapter)
