"""Phi3Tokenizer against transformers' apply_chat_template (oracle) for the four Phi-3 chat templates.

    python -m pytest tests/test_tokenizer.py

Oracle: PreTrainedTokenizerFast(tokenizer_file=...), which runs tokenizer.json's own pipeline (as transformers
4.x's LlamaTokenizerFast and vLLM do). transformers 5's AutoTokenizer rebuilds Llama-class tokenizers with a
Metaspace(prepend_scheme="first") pre-tokenizer and gives other ids for text after special tokens; that is a
transformers 5 change, not the checkpoint's tokenizer, so it is not the oracle here.
"""
import json
import os
import shutil
from pathlib import Path

import pytest

from phi3.tokenizer import CHAT_FORMATS, Phi3Tokenizer, TokenizerError, load_tokenizer

ASSETS = Path(__file__).resolve().parent.parent / "assets"
TOK_DIR = ASSETS / "tokenizer"

# variant -> tokenizer_config.json to combine with assets/tokenizer/tokenizer.json (None: the July one there)
VARIANTS = {
    "phi3": None,
    "phi3-bos": ASSETS / "configs/phi3-mini-128k-instruct-2024-05/tokenizer_config.json",
    "phi3-medium": ASSETS / "configs/phi3-medium-4k-instruct/tokenizer_config.json",
    "phi3.5": "mistralrs",
}

CONVERSATIONS = [
    [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hello"},
     {"role": "assistant", "content": "Hi there!"}],
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "2+2 = 4."},
     {"role": "user", "content": "And 3*3?"}, {"role": "assistant", "content": "9, obviously."},
     {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "You're welcome."}],
    [{"role": "system", "content": "Réponds en français 🇫🇷"}, {"role": "user", "content": "héllo 世界 🙂"},
     {"role": "assistant", "content": "😀😀 日本語のテキスト — ✓ ünïcödé"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": ""}, {"role": "assistant", "content": ""}],
    [{"role": "user", "content": "  leading and trailing  "},
     {"role": "assistant", "content": "\n\n  indented\n\tcode\n"},
     {"role": "user", "content": "   "}, {"role": "assistant", "content": "trailing spaces   "},
     {"role": "user", "content": "\n"}, {"role": "assistant", "content": " \t\n x"}],
    [{"role": "user", "content": "Write <|end|> and <s> literally"},
     {"role": "assistant", "content": "Sure: <|end|> then </s> and <|endoftext|>."}],
    [{"role": "user", "content": "only a question, no answer yet"}],
    [{"role": "user", "content": "a"}, {"role": "system", "content": "mid-conversation system"},
     {"role": "assistant", "content": "b"}, {"role": "assistant", "content": "c"}],
]


def _make_folder(root: Path, variant: str) -> Path:
    d = root / variant
    d.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json"):
        shutil.copy(TOK_DIR / name, d / name)
    src = VARIANTS[variant]
    if src == "mistralrs":  # only the template string is known for Phi-3.5: put it into the July config
        cfg = json.loads((TOK_DIR / "tokenizer_config.json").read_text())
        phi35 = json.loads((ASSETS / "configs/chat_template.mistralrs.json").read_text())
        cfg["chat_template"] = phi35["chat_template"]
        (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    elif src is not None:
        shutil.copy(src, d / "tokenizer_config.json")
    return d


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    return {v: _make_folder(root, v) for v in VARIANTS}


@pytest.fixture(scope="module")
def oracles(folders):
    transformers = pytest.importorskip("transformers", reason="transformers is the chat-template oracle")
    out = {}
    for v, d in folders.items():
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        out[v] = transformers.PreTrainedTokenizerFast(
            tokenizer_file=str(d / "tokenizer.json"), bos_token=cfg["bos_token"], eos_token=cfg["eos_token"],
            unk_token=cfg["unk_token"], pad_token=cfg["pad_token"], chat_template=cfg["chat_template"])
    return out


def _oracle_ids(oracle, messages, add_generation_prompt):
    r = oracle.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    if not isinstance(r, list):  # transformers 5 returns a BatchEncoding
        r = r["input_ids"]
    return list(r)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_detected(folders, variant):
    tok = load_tokenizer(folders[variant])
    assert tok.chat_format == variant
    assert tok.add_bos == (variant == "phi3-bos")
    assert tok.supports_system == (variant in ("phi3", "phi3.5"))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_render_ids_match_transformers(folders, oracles, variant):
    tok = load_tokenizer(folders[variant])
    for messages in CONVERSATIONS:
        for gen in (False, True):
            ids, mask = tok.render(messages, add_generation_prompt=gen)
            assert ids == _oracle_ids(oracles[variant], messages, gen), (variant, gen, messages)
            assert len(mask) == len(ids)


def _trained_segments(tok, ids, mask):
    """Decoded runs of trained tokens, split after each <|end|>."""
    segs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
            if i == tok.end_id:
                segs.append(tok.decode(cur, skip_special=False))
                cur = []
    assert not cur, "a trained run does not end with <|end|>"
    return segs


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_mask_is_assistant_content_and_end(folders, variant):
    tok = load_tokenizer(folders[variant])
    for messages in CONVERSATIONS:
        for gen in (False, True):
            ids, mask = tok.render(messages, add_generation_prompt=gen)
            # leading whitespace of a message is absorbed into the <|assistant|> token (rstrip) and not trained
            want = [m["content"].lstrip() + "<|end|>" for m in messages if m["role"] == "assistant"]
            trained = [i for i, m in zip(ids, mask) if m]
            assert trained == [i for w in want for i in tok.encode(w)], (variant, messages)
            if not any("<|" in m["content"] for m in messages):  # literal special tokens would split the runs
                assert _trained_segments(tok, ids, mask) == want, (variant, messages)
            if ids[-1] == tok.eos_id:
                assert not mask[-1], "the closing <|endoftext|> must not be trained"
            if variant == "phi3-bos":
                assert ids[0] == tok.bos_id and not mask[0]


def test_known_ids_and_mask():
    tok = load_tokenizer(TOK_DIR)
    ids, mask = tok.render(CONVERSATIONS[0])
    # README section 2: the July template, system + user + assistant
    assert ids == [32006, 887, 526, 263, 8444, 20255, 29889, 32007, 32010, 15043, 32007, 32001, 6324, 727, 29991,
                   32007, 32000]
    assert [i for i, m in zip(ids, mask) if m] == [6324, 727, 29991, 32007]
    ids, mask = tok.render(CONVERSATIONS[6], add_generation_prompt=True)
    assert ids[-1] == 32001 and not any(mask)


def test_special_ids_and_stop_ids():
    tok = load_tokenizer(TOK_DIR)
    assert isinstance(tok, Phi3Tokenizer)
    assert tok.vocab_size == 32011
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.end_id, tok.unk_id) == (1, 32000, 32000, 32007, 0)
    assert tok.stop_ids == (32000, 32001, 32007)
    assert not tok.add_bos


def test_stop_ids_fallback_and_int(tmp_path):
    d = _make_folder(tmp_path, "phi3")
    (d / "generation_config.json").unlink()
    assert load_tokenizer(d).stop_ids == (32000, 32007)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": 32007}))
    assert load_tokenizer(d).stop_ids == (32007,)


def test_encode_matches_test_vectors():
    tok = load_tokenizer(TOK_DIR)
    cases = json.loads((ASSETS / "configs/tokenizer_test_vectors.generated.json").read_text())["cases"]
    assert cases
    for c in cases:
        assert tok.encode(c["text"]) == c["ids"], c["text"]
        assert tok.decode(c["ids"], skip_special=False) == c["decode_skip_special_false"]
        assert tok.decode(c["ids"]) == c["decode_skip_special_true"]


def test_render_text_and_completion(folders):
    tok = load_tokenizer(folders["phi3"])
    ids, mask = tok.render_text("Hello world")
    assert ids == [15043, 3186, 32000] and all(mask)
    bos = load_tokenizer(folders["phi3-bos"])
    ids, mask = bos.render_text("Hello world")
    assert ids == [1, 15043, 3186, 32000] and mask == [False, True, True, True]
    p, c = "What is 2+2?", "4"
    assert tok.render_completion(p, c) == tok.render([{"role": "user", "content": p},
                                                      {"role": "assistant", "content": c}])


def test_render_rejects_bad_messages():
    tok = load_tokenizer(TOK_DIR)
    with pytest.raises(ValueError, match="role 'tool'"):
        tok.render([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="content is a int"):
        tok.render([{"role": "user", "content": 3}])


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: not found"):
        load_tokenizer(tmp_path)


def test_unknown_template_is_an_error_unless_forced(tmp_path):
    d = _make_folder(tmp_path, "phi3")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(TokenizerError, match="tokenizer_config.json: chat_template is not one of"):
        load_tokenizer(d)
    assert load_tokenizer(d, chat_format="phi3.5").chat_format == "phi3.5"
    assert set(CHAT_FORMATS) == set(VARIANTS) | {"phi4-mini", "phi4"}  # Phi-4's: tests/test_phi4_tokenizer.py


def test_template_files_beside_config(tmp_path):
    d = _make_folder(tmp_path, "phi3")
    medium = json.loads(VARIANTS["phi3-medium"].read_text())["chat_template"]
    (d / "chat_template.json").write_text(json.dumps({"chat_template": medium}))
    assert load_tokenizer(d).chat_format == "phi3-medium"  # chat_template.json wins over tokenizer_config.json
    bos = json.loads(VARIANTS["phi3-bos"].read_text())["chat_template"]
    (d / "chat_template.jinja").write_text(bos)
    assert load_tokenizer(d).chat_format == "phi3-bos"  # .jinja wins over both (as in transformers)


def test_no_template_falls_back_to_july(tmp_path):
    d = _make_folder(tmp_path, "phi3")
    (d / "tokenizer_config.json").unlink()
    tok = load_tokenizer(d)
    assert tok.chat_format == "phi3" and tok.eos_id == 32000 and not tok.add_bos


def test_tokenizer_without_rstrip(tmp_path):
    """April-2024 tokenizer.json (special tokens without rstrip): the "\\n" after <|end|>/<|assistant|> are real
    tokens; ids still match the oracle and those "\\n" tokens are not trained."""
    transformers = pytest.importorskip("transformers", reason="transformers is the chat-template oracle")
    d = _make_folder(tmp_path, "phi3")
    tj = json.loads((d / "tokenizer.json").read_text())
    for t in tj["added_tokens"]:
        t["rstrip"] = False
    (d / "tokenizer.json").write_text(json.dumps(tj))
    tok = load_tokenizer(d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    oracle = transformers.PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"), bos_token="<s>",
                                                  eos_token="<|endoftext|>", chat_template=cfg["chat_template"])
    assert tok.encode("<|user|>\nHello<|end|>\n<|assistant|>\n") == [32010, 29871, 13, 10994, 32007, 29871, 13,
                                                                      32001, 29871, 13]
    for messages in CONVERSATIONS:
        ids, mask = tok.render(messages)
        assert ids == _oracle_ids(oracle, messages, False)
        trained = [i for i, m in zip(ids, mask) if m]
        assert 13 not in trained or any("\n" in m["content"] for m in messages if m["role"] == "assistant")
        if not any("<|" in m["content"] for m in messages):
            want = [m["content"] + "<|end|>" for m in messages if m["role"] == "assistant"]
            got = _trained_segments(tok, ids, mask)
            assert [g.lstrip(" ") for g in got] == [w.lstrip(" ") for w in want], messages


# ---- tokenizer files from strangers: one TokenizerError line naming the file and key, never a traceback --------

def assert_refused(folder: Path, file: str, match: str) -> None:
    with pytest.raises(TokenizerError, match=match) as e:
        load_tokenizer(folder)
    message = str(e.value)
    assert message.startswith(str(folder / file)) and "\n" not in message and ";" in message, message


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps(dict(json.loads(path.read_text()), **changes)))


@pytest.mark.parametrize("key,value", [
    ("bos_token", 5), ("bos_token", {"content": 5}), ("bos_token", ["<s>"]), ("eos_token", True),
    ("pad_token", {"id": 32000}), ("unk_token", 3.5), ("add_bos_token", "true"), ("add_bos_token", 1),
    ("chat_template", 5), ("chat_template", [1, 2]), ("chat_template", [{"name": "default", "template": 5}]),
    ("chat_template", {"default": "x"}),
])
def test_tokenizer_config_with_wrong_types(tmp_path, key, value):
    d = _make_folder(tmp_path, "phi3")
    edit_json(d / "tokenizer_config.json", **{key: value})
    assert_refused(d, "tokenizer_config.json", f"'{key}' must be")


@pytest.mark.parametrize("key,value", [("bos_token", "<bos>"), ("eos_token", {"content": "</eos>"})])
def test_special_token_missing_from_tokenizer_json(tmp_path, key, value):
    d = _make_folder(tmp_path, "phi3")
    edit_json(d / "tokenizer_config.json", **{key: value})
    assert_refused(d, "tokenizer_config.json", f"{key} .* is not a token of .*tokenizer.json")


@pytest.mark.parametrize("value", ["32000", [32000, "x"], [True], True, -1, 10**9, 1.5, {"a": 1}, [32000, 40000], []])
def test_generation_config_stop_ids_with_wrong_values(tmp_path, value):
    """An empty list too: no stop ids would leave sampling without an end (it fell back to the defaults silently)."""
    d = _make_folder(tmp_path, "phi3")
    edit_json(d / "generation_config.json", eos_token_id=value)
    assert_refused(d, "generation_config.json", "'eos_token_id' must be a token id or a non-empty list of them.*"
                   "own generation_config.json")


@pytest.mark.parametrize("file", ["tokenizer_config.json", "generation_config.json", "chat_template.json"])
@pytest.mark.parametrize("content,what", [
    (b"[]", "expected a JSON object"), (b"5", "expected a JSON object"), (b"{", "not valid JSON"),
    (b"[" * 100_000, "nesting too deep"), (b"\xff\xfe{}", "not UTF-8"),
])
def test_json_files_that_are_not_objects(tmp_path, file, content, what):
    d = _make_folder(tmp_path, "phi3")
    (d / file).write_bytes(content)
    assert_refused(d, file, what + (".*own generation_config.json" if file == "generation_config.json" else ""))


@pytest.mark.parametrize("file", ["tokenizer_config.json", "generation_config.json"])
def test_json_key_given_twice_is_refused(tmp_path, file):
    """json keeps the last of two equal keys without a word: which one the author meant is a guess."""
    d = _make_folder(tmp_path, "phi3")
    text = (d / file).read_text()
    (d / file).write_text(text.replace("{", '{"eos_token_id": 32000, "eos_token_id": 32007, ', 1))
    assert_refused(d, file, "key 'eos_token_id' appears twice")


@pytest.mark.parametrize("content", [b"", b"[]", b"{}", b"[" * 100_000, b'{"model": 5}', b"\xff",
                                     b'{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a b"]}}'])
def test_tokenizer_json_that_tokenizers_cannot_load(tmp_path, content):
    d = _make_folder(tmp_path, "phi3")
    (d / "tokenizer.json").write_bytes(content)
    assert_refused(d, "tokenizer.json", "cannot be parsed by tokenizers")


@pytest.mark.parametrize("file", ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"])
def test_fifo_instead_of_a_file_does_not_hang(tmp_path, file):
    d = _make_folder(tmp_path, "phi3")
    (d / file).unlink(missing_ok=True)
    os.mkfifo(d / file)  # open() would wait for a writer forever
    assert_refused(d, file, "not a regular file")


@pytest.mark.parametrize("template", [
    b"\xff\xfe not UTF-8",
    b"'a\\" * 100_000,  # re.split in _fingerprint would take minutes on this (quadratic); too long to be Phi-3's
    b"{{ bos_token }}" * 5_000,
])
def test_unknown_template_file_is_refused_quickly(tmp_path, template):
    d = _make_folder(tmp_path, "phi3")
    (d / "chat_template.jinja").write_bytes(template)
    assert_refused(d, "chat_template.jinja", "chat_template is not one of the supported")
    assert load_tokenizer(d, chat_format="phi3").chat_format == "phi3"  # forcing a format skips the file
