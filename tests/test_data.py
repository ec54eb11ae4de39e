"""JSONL reading/validation, truncation, batching and packing.

    python -m pytest tests/test_data.py
"""
import json
import random
from pathlib import Path

import pytest
import torch

from phi3.data import (Batch, DataError, DataStats, Example, make_batches, pad_token_for, read_jsonl,
                       split_eval)
from phi3.tokenizer import load_tokenizer

TOK_DIR = Path(__file__).resolve().parent.parent / "assets" / "tokenizer"

CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": "Hello!"}]}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TOK_DIR)


def _write(tmp_path, lines, name="d.jsonl") -> Path:
    p = tmp_path / name
    if isinstance(lines, bytes):
        p.write_bytes(lines)
    else:
        p.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    return p


# --- formats ------------------------------------------------------------------------------------------------

def test_all_formats_in_one_file(tmp_path, tok):
    sharegpt = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                                  {"from": "gpt", "value": "Hello!"}]}
    ultrachat = {"prompt": "Hi", "prompt_id": "x1", **CHAT}  # extra keys next to "messages" are ignored
    p = _write(tmp_path, [CHAT, "", sharegpt, {"prompt": "2+2?", "completion": "4"}, "   ", {"text": "Plain text."},
                          ultrachat])
    ex, stats = read_jsonl(p, tok, max_seq_len=64)
    assert len(ex) == stats.examples == 5
    chat = tok.render(CHAT["messages"])
    assert (ex[0].ids, ex[0].mask) == chat
    assert (ex[1].ids, ex[1].mask) == chat
    assert (ex[2].ids, ex[2].mask) == tok.render_completion("2+2?", "4")
    assert (ex[3].ids, ex[3].mask) == tok.render_text("Plain text.")
    assert (ex[4].ids, ex[4].mask) == chat
    assert stats.tokens == sum(len(e.ids) for e in ex)
    assert stats.trained_tokens == sum(sum(e.mask[1:]) for e in ex)
    assert stats.truncated == 0
    s = stats.summary()
    assert "5 examples" in s and "%" in s


def test_train_on_all(tmp_path, tok):
    p = _write(tmp_path, [CHAT])
    (e,), stats = read_jsonl(p, tok, train_on="all", max_seq_len=64)
    assert all(e.mask) and stats.trained_tokens == len(e.ids) - 1
    with pytest.raises(ValueError, match="train_on"):
        read_jsonl(p, tok, train_on="prompt", max_seq_len=64)


# --- bad input: every case names the file, the line, and what is wrong ---------------------------------------

BAD = [
    ("invalid_json", [CHAT, '{"messages": [}'], 2, "invalid JSON"),
    ("unknown_format", [CHAT, CHAT, {"question": "q", "answer": "a"}], 3, "keys found: answer, question"),
    ("prompt_without_completion", [{"prompt": "q"}], 1, "Expected one of"),
    ("unknown_role", [{"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "a"}]}], 1,
     "messages[1] has unknown role 'tool'"),
    ("unknown_sharegpt_role", [{"conversations": [{"from": "bot", "value": "a"}]}], 1, "unknown role (from) 'bot'"),
    ("no_assistant", [{"messages": [{"role": "user", "content": "q"}]}], 1, "no assistant turn"),
    ("non_string_content", [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 5}]}],
     1, "messages[1].content is a int, not a string"),
    ("null_content", [{"conversations": [{"from": "gpt", "value": None}]}], 1, "conversations[0].value is a NoneType"),
    ("messages_not_list", [{"messages": "hello"}], 1, '"messages" is a str, not a list'),
    ("message_not_object", [{"messages": ["hello"]}], 1, "messages[0] is \"hello\", not an object"),
    ("empty_messages", [{"messages": []}], 1, '"messages" is empty'),
    ("top_level_array", [[1, 2]], 1, "JSON list, not an object"),
    ("text_not_string", [{"text": ["a"]}], 1, '"text" is a list, not a string'),
    ("empty_text", ["", "", {"text": "  "}], 3, '"text" is empty'),
    ("completion_not_string", [{"prompt": "q", "completion": 3}], 1, '"completion" is a int'),
]


@pytest.mark.parametrize("name,lines,line,what", BAD, ids=[b[0] for b in BAD])
def test_bad_input_messages(tmp_path, tok, name, lines, line, what):
    p = _write(tmp_path, lines)
    with pytest.raises(DataError) as e:
        read_jsonl(p, tok, max_seq_len=64)
    msg = str(e.value)
    assert msg.startswith(f"{p}:{line}: "), msg
    assert what in msg, msg
    assert e.value.line == line and e.value.path == str(p)
    assert msg.count(". ") >= 1  # "what is wrong. what to do"


def test_non_utf8_line(tmp_path, tok):
    p = _write(tmp_path, json.dumps(CHAT).encode() + b"\n" + b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=rf"^{p}:2: bytes are not UTF-8 .*Re-save the file as UTF-8"):
        read_jsonl(p, tok, max_seq_len=64)


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
def test_empty_file(tmp_path, tok, content):
    p = _write(tmp_path, content)
    with pytest.raises(DataError, match=rf"^{p}: no records \(the file is empty or has only blank lines\)\. "):
        read_jsonl(p, tok, max_seq_len=64)


def test_missing_file(tmp_path, tok):
    with pytest.raises(DataError, match="cannot read the file"):
        read_jsonl(tmp_path / "nope.jsonl", tok, max_seq_len=64)


def test_every_record_is_validated_and_more_errors_are_counted(tmp_path, tok):
    p = _write(tmp_path, [CHAT] * 50 + ["{bad", CHAT, {"x": 1}, {"text": 3}])
    with pytest.raises(DataError) as e:
        read_jsonl(p, tok, max_seq_len=64)
    assert str(e.value).startswith(f"{p}:51: invalid JSON")
    assert "2 more bad lines: 53, 54" in str(e.value)


def test_bom_and_crlf(tmp_path, tok):
    p = _write(tmp_path, b"\xef\xbb\xbf" + json.dumps(CHAT).encode() + b"\r\n" + json.dumps(CHAT).encode() + b"\r\n")
    ex, _ = read_jsonl(p, tok, max_seq_len=64)
    assert len(ex) == 2


# --- truncation ---------------------------------------------------------------------------------------------

def test_truncation_counted_and_dropped_named(tmp_path, tok):
    long_answer = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "word " * 50}]}
    long_prompt = {"messages": [{"role": "user", "content": "word " * 50}, {"role": "assistant", "content": "ok"}]}
    p = _write(tmp_path, [CHAT, long_answer, long_prompt])
    ex, stats = read_jsonl(p, tok, max_seq_len=20)
    assert stats.truncated == 2 and stats.dropped == 1 and stats.examples == len(ex) == 2
    assert all(len(e.ids) <= 20 for e in ex)
    assert len(ex[1].ids) == 20 and any(ex[1].mask[1:])
    s = stats.summary()
    assert "2 truncated to 20 tokens" in s and "1 dropped" in s and "raise max_seq_len" in s
    assert stats.tokens == sum(len(e.ids) for e in ex)


# --- batching -----------------------------------------------------------------------------------------------

def _random_examples(n, seed=0, lo=2, hi=40):
    r = random.Random(seed)
    out = []
    for k in range(n):
        L = r.randint(lo, hi)
        out.append(Example([1000 * (k + 1) + t for t in range(L)], [r.random() < 0.6 for _ in range(L)]))
    return out


def _expected_labels(e):
    return [e.ids[t + 1] if e.mask[t + 1] else -100 for t in range(len(e.ids) - 1)] + [-100]


def test_unpacked_batches(tok):
    ex = _random_examples(7)
    pad = pad_token_for(tok)
    bs = make_batches(ex, batch_size=3, max_seq_len=64, pad_id=pad, packing=False, shuffle=False, seed=0)
    assert [b.input_ids.shape[0] for b in bs] == [3, 3, 1]
    for bi, b in enumerate(bs):
        assert isinstance(b, Batch) and b.document_ids is None
        assert b.input_ids.dtype == b.labels.dtype == b.position_ids.dtype == torch.long
        T = b.input_ids.shape[1]
        assert T == max(len(e.ids) for e in ex[3 * bi:3 * bi + 3])
        for r in range(b.input_ids.shape[0]):
            e = ex[3 * bi + r]
            n = len(e.ids)
            assert b.input_ids[r, :n].tolist() == e.ids
            assert b.input_ids[r, n:].eq(pad).all()
            assert b.labels[r].tolist() == _expected_labels(e) + [-100] * (T - n)
            assert b.position_ids[r, :n].tolist() == list(range(n))
        assert b.trained_tokens == int((b.labels != -100).sum())


def test_packing_documents_positions_labels():
    ex = _random_examples(60, seed=1)
    T = 64
    bs = make_batches(ex, batch_size=4, max_seq_len=T, pad_id=0, packing=True, shuffle=True, seed=3)
    seen = []
    for b in bs:
        assert b.input_ids.shape[1] == T and b.document_ids is not None
        for r in range(b.input_ids.shape[0]):
            ids, lab, pos, doc = (x[r].tolist() for x in (b.input_ids, b.labels, b.position_ids, b.document_ids))
            for t in range(T):
                if lab[t] != -100:  # no label crosses a document boundary or lands on padding
                    assert doc[t] == doc[t + 1] != -1 and lab[t] == ids[t + 1]
            real = [d for d in doc if d != -1]
            assert real == sorted(real) and doc[len(real):] == [-1] * (T - len(real))  # padding only at the end
            for d in sorted(set(real)):
                span = [t for t in range(T) if doc[t] == d]
                e = next(x for x in ex if x.ids == [ids[t] for t in span])
                assert [pos[t] for t in span] == list(range(len(span)))
                assert [lab[t] for t in span] == _expected_labels(e)
                seen.append(e.ids[0])
        assert b.trained_tokens == int((b.labels != -100).sum())
    assert sorted(seen) == sorted(e.ids[0] for e in ex)  # every example exactly once
    assert sum(b.trained_tokens for b in bs) == sum(sum(e.mask[1:]) for e in ex)
    rows = sum(b.input_ids.shape[0] for b in bs)
    assert rows <= -(-sum(len(e.ids) for e in ex) // T) + 2  # packing is near-optimal


def test_pack_large_is_fast_and_fits():
    from phi3.data import _pack
    r = random.Random(0)
    lengths = [r.randint(1, 2048) for _ in range(50_000)]
    bins = _pack(lengths, list(range(len(lengths))), 2048)
    assert all(sum(lengths[i] for i in b) <= 2048 for b in bins)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert len(bins) <= sum(lengths) / 2048 * 1.02 + 1


@pytest.mark.parametrize("packing", [False, True])
def test_batches_deterministic(packing):
    ex = _random_examples(40, seed=2)

    def run(seed, epoch):
        bs = make_batches(ex, 4, 64, 0, packing=packing, shuffle=True, seed=seed, epoch=epoch)
        return [b.input_ids.tolist() for b in bs]

    assert run(0, 0) == run(0, 0)
    assert run(0, 0) != run(0, 1)
    assert run(0, 0) != run(1, 0)
    a = make_batches(ex, 4, 64, 0, packing=packing, shuffle=False, seed=0, epoch=0)
    b = make_batches(ex, 4, 64, 0, packing=packing, shuffle=False, seed=5, epoch=7)
    assert [x.input_ids.tolist() for x in a] == [x.input_ids.tolist() for x in b]


def test_too_long_example_rejected():
    with pytest.raises(ValueError, match="max_seq_len"):
        make_batches(_random_examples(2, lo=30, hi=30), 2, 16, 0, packing=True, shuffle=False, seed=0)


def test_pad_token_is_not_a_stop_id(tok):
    pad = pad_token_for(tok)
    assert tok.pad_id in tok.stop_ids  # Phi-3: pad = <|endoftext|> = a stop id
    assert pad == 0 and pad not in tok.stop_ids

    class Fake:
        pad_id, unk_id, stop_ids = 5, 0, (2,)

    assert pad_token_for(Fake()) == 5


def test_split_eval():
    ex = _random_examples(20)
    tr, ev = split_eval(ex, 0.25, seed=0)
    assert len(ev) == 5 and len(tr) == 15
    assert {id(e) for e in tr}.isdisjoint(id(e) for e in ev)
    assert split_eval(ex, 0.25, seed=0) == (tr, ev)
    assert split_eval(ex, 0.0, seed=0) == (ex, [])
    assert [len(x) for x in split_eval(ex[:2], 0.01, seed=0)] == [1, 1]
    with pytest.raises(ValueError):
        split_eval(ex, 1.0, seed=0)


def test_stats_summary_format():
    s = DataStats(examples=3, tokens=200, trained_tokens=50, truncated=0, max_seq_len=128).summary()
    assert s == "3 examples, 200 tokens, 50 trained (25.0%), 0 truncated to 128 tokens"


def test_system_messages_dropped_by_template_are_counted(tmp_path, tok):
    import shutil
    d = tmp_path / "medium"
    d.mkdir()
    shutil.copy(TOK_DIR / "tokenizer.json", d / "tokenizer.json")
    shutil.copy(TOK_DIR.parent / "configs/phi3-medium-4k-instruct/tokenizer_config.json", d / "tokenizer_config.json")
    medium = load_tokenizer(d)
    _, stats = read_jsonl(_write(tmp_path, [CHAT, CHAT]), medium, max_seq_len=64)
    assert stats.system_dropped == 2 and "2 system messages left out" in stats.summary()
    _, stats = read_jsonl(_write(tmp_path, [CHAT]), tok, max_seq_len=64)
    assert stats.system_dropped == 0 and "system" not in stats.summary()


def test_data_error_plain_message():
    e = DataError("whole message")
    assert str(e) == "whole message" and e.line is None
