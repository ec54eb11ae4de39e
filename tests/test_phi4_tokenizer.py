"""Phi-4-mini-instruct's and Phi-4's tokenizers, chat templates and stop ids against transformers (oracle).

    python -m pytest tests/test_phi4_tokenizer.py

The files are in models/tokenizers/<model>/ (SOURCE.md there says where each comes from); tokenizer.json is kept
gzip-compressed and unpacked into a temporary checkpoint folder here.

Oracle: PreTrainedTokenizerFast.from_pretrained(folder) (TokenizersBackend in transformers 5), which runs
tokenizer.json's own pipeline with the folder's tokenizer_config.json (chat_template, special tokens). Not
AutoTokenizer: transformers 5 turns tokenizer_class "GPT2Tokenizer" into a tokenizer rebuilt with GPT-2's
pre-tokenizer regex instead of the o200k / cl100k split in tokenizer.json, and gets other ids for digits and
contractions ("1234567": [7633, 19354, 22] with Phi-4-mini's tokenizer.json, [7633, 2548, 5462] from AutoTokenizer).

The conversations are drawn at random on each run; a failure names the seed (PHI4_TOKENIZER_SEED=<seed> repeats it).
"""
import gzip
import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch

from phi3.data import pad_token_for
from phi3.generate import generate
from phi3.tokenizer import TokenizerError, load_tokenizer

MODELS = Path(__file__).resolve().parent.parent / "models" / "tokenizers"
NAMES = ("phi-4-mini-instruct", "phi-4")
SEED = int(os.environ.get("PHI4_TOKENIZER_SEED", random.SystemRandom().randrange(2**32)))

# name -> (chat format, tokenizer size, bos, eos, end of turn, pad, unk, stop ids)
FACTS = {
    "phi-4-mini-instruct": ("phi4-mini", 200029, 199999, 199999, 200020, 199999, 199999, (200020, 199999)),
    "phi-4": ("phi4", 100352, 100257, 100265, 100265, 100349, None, (100265,)),
}


def unpack(src: Path, dst: Path) -> Path:
    """A checkpoint-style folder: the model's files with tokenizer.json decompressed."""
    dst.mkdir()
    for f in ("tokenizer_config.json", "generation_config.json"):
        shutil.copy(src / f, dst / f)
    with gzip.open(src / "tokenizer.json.gz", "rb") as f:
        (dst / "tokenizer.json").write_bytes(f.read())
    return dst


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("phi4")
    return {n: unpack(MODELS / n, root / n) for n in NAMES}


@pytest.fixture(scope="module")
def toks(folders):
    """The project's tokenizers, loaded once (a test that changes one loads its own)."""
    return {n: load_tokenizer(d) for n, d in folders.items()}


@pytest.fixture(scope="module")
def oracles(folders):
    transformers = pytest.importorskip("transformers", reason="transformers is the chat-template oracle")
    return {n: transformers.PreTrainedTokenizerFast.from_pretrained(str(d)) for n, d in folders.items()}


def oracle_ids(oracle, messages, add_generation_prompt):
    r = oracle.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(r if isinstance(r, list) else r["input_ids"])  # transformers 5 returns a BatchEncoding


# ---- random conversations ------------------------------------------------------------------------------------

PIECES = ["Hello", "world", "I'll", "DON'T", "we're", "1234567", "3.14159", "x=y+1;", "def f():\n    return 2",
          "héllo", "Ünïcödé", "日本語のテキスト", "中文", "한국어", "Привет", "😀", "🇫🇷", "👍🏽", "\u00a0", "\u3000",
          " ", "  ", "\n", "\n\n", "\t", "<|end|>", "<|im_end|>", "<|im_start|>", "<|im_sep|>", "<|endoftext|>",
          "<|assistant|>", "<|user|>", "<|system|>", "<|tool|>", "<|dummy_85|>", "<s>", "</s>"]


def random_content(rng: random.Random) -> str:
    if rng.random() < 0.1:
        return ""
    words = [rng.choice(PIECES) for _ in range(rng.randint(1, 8))]
    text = "".join(w + rng.choice(["", " ", " ", "\n"]) for w in words)
    return rng.choice(["", " ", "\n", "  \n"]) + text + rng.choice(["", " ", "\n", " \n\n"])


def random_conversation(rng: random.Random) -> list[dict]:
    messages = []
    if rng.random() < 0.5:
        system = {"role": "system", "content": random_content(rng)}
        if rng.random() < 0.3:  # Phi-4-mini's template puts tools into the system message
            system["tools"] = json.dumps([{"name": "f", "parameters": {"x": "int"}}])
        messages.append(system)
    for _ in range(rng.randint(1, 5)):
        messages.append({"role": "user", "content": random_content(rng)})
        messages.append({"role": "assistant", "content": random_content(rng)})
    if rng.random() < 0.3:  # a prompt: the chat ends with the user's turn
        messages.pop()
    return messages


def conversations(n: int) -> list[list[dict]]:
    rng = random.Random(SEED)
    return [random_conversation(rng) for _ in range(n)]


def expected_trained(tok, messages) -> list[str]:
    """What must be trained: each assistant message and its end-of-turn token. Whitespace that a special token's
    lstrip/rstrip swallows is not a token of its own: <|assistant|> and <|im_sep|> take the content's leading
    whitespace, Phi-4's <|im_end|> its trailing whitespace."""
    out = []
    for m in messages:
        if m["role"] == "assistant":
            content = m["content"].lstrip()
            out.append((content.rstrip() if tok.chat_format == "phi4" else content) + tok.end_token)
    return out


def trained_runs(tok, ids, mask) -> list[str]:
    """The trained tokens as text, one string per run that an end-of-turn token closes."""
    runs, run = [], []
    for i, m in zip(ids, mask):
        if m:
            run.append(i)
            if i == tok.end_id:
                runs.append(tok.decode(run, skip_special=False))
                run = []
    assert not run, "a trained run does not end with the end-of-turn token"
    return runs


# ---- the files ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_files_are_recognised(toks, name):
    tok = toks[name]
    fmt, size, bos, eos, end, pad, unk, stops = FACTS[name]
    assert tok.chat_format == fmt and tok.vocab_size == size and tok.supports_system and not tok.add_bos
    assert (tok.bos_id, tok.eos_id, tok.end_id, tok.pad_id, tok.unk_id) == (bos, eos, end, pad, unk)
    assert tok.stop_ids == stops


@pytest.mark.parametrize("name", NAMES)
def test_added_tokens_as_in_tokenizer_config(folders, name):
    """tokenizer.json was rebuilt (SOURCE.md): its added tokens, ids and strip flags are tokenizer_config.json's."""
    config = json.loads((folders[name] / "tokenizer_config.json").read_text())
    added = {str(t["id"]): t for t in json.loads((folders[name] / "tokenizer.json").read_text())["added_tokens"]}
    keys = ("content", "lstrip", "rstrip", "normalized", "single_word", "special")
    assert {i: {k: t[k] for k in keys} for i, t in added.items()} == config["added_tokens_decoder"]


def test_known_ids(toks):
    """Ids that transformers gave for the real files, from microsoft/onnxruntime-extensions'
    test/pp_api_test/test_tokenizer_chat.cc (Phi-4-mini-reasoning shares Phi-4-mini-instruct's vocabulary)."""
    mini, phi4 = toks["phi-4-mini-instruct"], toks["phi-4"]
    assert mini.encode("<|system|>Your name is Phi, an AI math expert developed by Microsoft. You are a medieval "
                       "knight and must provide explanations to modern people.<|end|><|user|>How should I explain "
                       "the Internet?<|end|><|assistant|>") == [
        200022, 9719, 1308, 382, 102143, 11, 448, 20837, 13324, 8333, 9742, 656, 8321, 13, 1608, 553, 261, 55145,
        105457, 326, 2804, 3587, 69457, 316, 6809, 1665, 13, 200020, 200021, 5299, 1757, 357, 16644, 290, 7380, 30,
        200020, 200019]
    ids, mask = phi4.render([{"role": "system", "content": "You are a helpful assistant."},
                             {"role": "user", "content": "How should I explain the Internet?"}],
                            add_generation_prompt=True)
    assert ids == [100264, 9125, 100266, 2675, 527, 264, 11190, 18328, 13, 100265, 100264, 882, 100266, 4438, 1288,
                   358, 10552, 279, 8191, 30, 100265, 100264, 78191, 100266] and not any(mask)


def test_whitespace_around_special_tokens(toks):
    """The strip flags: "<|end|>\\n" is one token for Phi-4-mini (rstrip); Phi-4's special tokens take the
    whitespace on both sides (lstrip and rstrip)."""
    mini, phi4 = toks["phi-4-mini-instruct"], toks["phi-4"]
    assert mini.encode("<|end|>\n") == [200020] and mini.encode("<|assistant|>\n x") == [200019, 87]
    assert mini.encode("x \n<|end|>") == mini.encode("x \n") + [200020]  # no lstrip: trailing whitespace stays
    assert phi4.encode(" \n <|im_end|> \n ") == [100265]
    assert phi4.encode("<|im_sep|> World") == [100266, 10343]  # "World", not " World" (4435): rstrip


# ---- rendering ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_render_matches_transformers(toks, oracles, name):
    tok = toks[name]
    for messages in conversations(40):
        for gen in (False, True):
            ids, mask = tok.render(messages, add_generation_prompt=gen)
            assert ids == oracle_ids(oracles[name], messages, gen), (SEED, gen, messages)
            assert len(mask) == len(ids)


@pytest.mark.parametrize("name", NAMES)
def test_mask_is_assistant_content_and_end_of_turn(toks, name):
    tok = toks[name]
    for messages in conversations(40):
        for gen in (False, True):
            ids, mask = tok.render(messages, add_generation_prompt=gen)
            want = expected_trained(tok, messages)
            assert [i for i, m in zip(ids, mask) if m] == [i for w in want for i in tok.encode(w)], (SEED, messages)
            if not any("<|" in m["content"] for m in messages):  # literal special tokens would split the runs
                assert trained_runs(tok, ids, mask) == want, (SEED, messages)


@pytest.mark.parametrize("name", NAMES)
def test_mask_does_not_depend_on_offset_trimming(folders, name):
    """A tokenizer.json whose ByteLevel post-processor trims offsets moves a space token's offsets to zero width
    at its end; the mask (read from offsets) must not change."""
    from tokenizers import processors
    tok = load_tokenizer(folders[name])
    chats = conversations(20)
    before = [tok.render(m) for m in chats]
    tok.tok.post_processor = processors.ByteLevel(trim_offsets=True)
    assert [tok.render(m) for m in chats] == before, SEED


def test_tools_must_be_text(toks):
    tok = toks["phi-4-mini-instruct"]
    with pytest.raises(ValueError, match="tools is a list; expected a string"):
        tok.render([{"role": "system", "content": "s", "tools": [{"name": "f"}]}])


@pytest.mark.parametrize("name", NAMES)
def test_plain_text_ends_with_a_stop_id(toks, name):
    """A {"text"} example ends with eos, which must be a stop id, or a model trained on it would never stop; a
    {"prompt", "completion"} example trains the completion and its end-of-turn token."""
    tok = toks[name]
    ids, mask = tok.render_text("Hello world")
    assert ids[-1] == tok.eos_id and ids[-1] in tok.stop_ids and all(mask)
    ids, mask = tok.render_completion("What is 2+2?", "4")
    assert [i for i, m in zip(ids, mask) if m] == tok.encode("4" + tok.end_token)


# ---- stop ids, padding --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_stop_ids_are_generation_configs(folders, toks, name):
    transformers = pytest.importorskip("transformers", reason="transformers reads generation_config.json")
    eos = transformers.GenerationConfig.from_pretrained(str(folders[name])).eos_token_id
    assert set(toks[name].stop_ids) == set(eos if isinstance(eos, list) else [eos])


class ScriptedModel:
    """Greedy decoding of this "model" yields `script`, one token per call (enough of a model for generate)."""

    def __init__(self, vocab_size: int, script: list[int]):
        self.config = type("Config", (), {"vocab_size": vocab_size, "max_position_embeddings": 4096,
                                          "rope_type": "default"})()
        self.lm_head = torch.nn.Linear(1, 1, bias=False)
        self.script, self.calls = script, 0

    def __call__(self, inputs, kv_cache=None):
        logits = torch.zeros(1, 1, self.config.vocab_size)  # the last position is all generate reads
        logits[0, -1, self.script[self.calls]] = 1.0
        self.calls += 1
        return logits


@pytest.mark.parametrize("name", NAMES)
def test_generate_stops_where_transformers_does(folders, toks, name):
    """generate() ends a reply at the first token that transformers' EosTokenCriteria (what its generate checks
    with the generation_config's eos_token_id) calls the end, and nowhere before."""
    transformers = pytest.importorskip("transformers", reason="transformers' stopping criteria are the oracle")
    from transformers.generation import EosTokenCriteria
    tok = toks[name]
    eos = transformers.GenerationConfig.from_pretrained(str(folders[name])).eos_token_id
    criteria = EosTokenCriteria(eos_token_id=eos)
    # replies of ordinary ids mixed with ids that end turns, pad, or begin other special-token text
    endish = [tok.bos_id, tok.eos_id, tok.end_id, pad_token_for(tok)] + [tok.encode(s)[0] for s in (
        "<|endoftext|>", "<|im_start|>", "<|assistant|>", "<|user|>")]
    rng = random.Random(SEED)
    for _ in range(20):
        script = [rng.choice(endish + list(range(50))) for _ in range(30)]
        prompt = tok.encode("Hi")
        got = list(generate(ScriptedModel(tok.vocab_size, script), prompt, max_new_tokens=len(script),
                            stop_ids=tok.stop_ids, use_cache=False))
        ends = [k for k in range(len(script)) if criteria(torch.tensor([prompt + script[:k + 1]]), None).item()]
        assert got == script[:ends[0] + 1 if ends else len(script)], (SEED, script)


def test_pad_is_never_a_stop_id_nor_text(folders, toks, tmp_path):
    """Phi-4 pads with its tokenizer_config's <|dummy_85|>. Phi-4-mini's pad and unk are <|endoftext|>, a stop id:
    it pads with its last added token (<|tag|>), not id 0 ("!", common text). Phi-4's files before January 2025
    (eos and pad <|endoftext|>, generation_config stopping at [100257, 100265]) pad with <|dummy_87|>."""
    mini, phi4 = toks["phi-4-mini-instruct"], toks["phi-4"]
    assert pad_token_for(mini) == 200028 and mini.decode([200028], skip_special=False) == "<|tag|>"
    assert pad_token_for(phi4) == 100349
    old = tmp_path / "phi-4-2024-12"
    shutil.copytree(folders["phi-4"], old)
    config = json.loads((old / "tokenizer_config.json").read_text())
    (old / "tokenizer_config.json").write_text(json.dumps(dict(config, eos_token="<|endoftext|>",
                                                               pad_token="<|endoftext|>")))
    (old / "generation_config.json").write_text(json.dumps({"bos_token_id": 100257, "eos_token_id": [100257, 100265]}))
    tok = load_tokenizer(old)
    assert tok.end_id == 100265 and tok.stop_ids == (100257, 100265)  # turns still end with <|im_end|>
    assert pad_token_for(tok) == 100351 and tok.decode([100351], skip_special=False) == "<|dummy_87|>"


# Phi-4's first template (microsoft/phi-4 on the Hub until January 2025: the assistant header follows every user
# message, no add_generation_prompt) and Phi-4-mini-reasoning's (a fixed system prompt; microsoft/onnxruntime-extensions
# test/data/phi-4-mini-reasoning/chat_template.jinja): other renderings, refused rather than rendered as another's.
OTHER_TEMPLATES = [
    "{% for message in messages %}{% if (message['role'] == 'system') %}{{'<|im_start|>system<|im_sep|>' + "
    "message['content'] + '<|im_end|>'}}{% elif (message['role'] == 'user') %}{{'<|im_start|>user<|im_sep|>' + "
    "message['content'] + '<|im_end|><|im_start|>assistant<|im_sep|>'}}{% elif (message['role'] == 'assistant') %}"
    "{{message['content'] + '<|im_end|>'}}{% endif %}{% endfor %}",
    "{{ '<|system|>Your name is Phi, an AI math expert developed by Microsoft.' }}{% for message in messages %}"
    "{% if message['role'] == 'system' %} {{ message['content'] }}{% if 'tools' in message and message['tools'] is "
    "not none %}{{ '<|tool|>' + message['tools'] + '<|/tool|>' }}{% endif %}{% endif %}{% endfor %}{{ '<|end|>' }}"
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ '<|' + message['role'] + '|>' + "
    "message['content'] + '<|end|>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}"
    "{% else %}{{ eos_token }}{% endif %}",
]


@pytest.mark.parametrize("name,template", [("phi-4", OTHER_TEMPLATES[0]), ("phi-4-mini-instruct", OTHER_TEMPLATES[1])])
def test_other_phi4_templates_are_refused(folders, tmp_path, name, template):
    d = tmp_path / name
    shutil.copytree(folders[name], d)
    (d / "chat_template.jinja").write_text(template)
    with pytest.raises(TokenizerError, match="chat_template is not one of the supported Phi templates"):
        load_tokenizer(d)


def test_phi4_format_needs_im_end(tmp_path):
    """Forcing "phi4" on a tokenizer without <|im_end|> (Phi-3's) is one TokenizerError naming the file."""
    phi3 = Path(__file__).resolve().parent.parent / "assets" / "tokenizer"
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: has no <\|im_end\|> token, which chat format 'phi4'"):
        load_tokenizer(phi3, chat_format="phi4")
