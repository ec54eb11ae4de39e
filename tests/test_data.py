"""JSONL reading/validation, truncation, batching and packing.

    python -m pytest tests/test_data.py
"""
import errno
import gzip
import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch

from phi3 import data
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

U = {"role": "user", "content": "q"}
DEEP = 100_000  # far past Python's recursion limit


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


BAD = [
    ("invalid_json", [CHAT, '{"messages": [}'], 2, "invalid JSON"),
    ("unknown_format", [CHAT, CHAT, {"question": "q", "answer": "a"}], 3, "keys found: answer, question"),
    ("empty_object", [{}], 1, "unknown record format (keys found: none)"),
    ("odd_keys", [{"a\nb": 1, "\ud800": 2, "k" * 500: 3}], 1, "keys found: 'a\\nb', "),
    ("prompt_without_completion", [{"prompt": "q"}], 1, "Expected one of"),
    ("unknown_role", [{"messages": [U, {"role": "tool", "content": "a"}]}], 1, "messages[1] has unknown role 'tool'"),
    ("unknown_sharegpt_role", [{"conversations": [{"from": "bot", "value": "a"}]}], 1, "unknown role (from) 'bot'"),
    ("no_assistant", [{"messages": [U]}], 1, "no assistant turn"),
    ("non_string_content", [{"messages": [U, {"role": "assistant", "content": 5}]}], 1,
     "messages[1].content is a number, not a string"),
    ("null_content", [{"conversations": [{"from": "gpt", "value": None}]}], 1, "conversations[0].value is null"),
    ("messages_not_list", [{"messages": "hello"}], 1, '"messages" is a string, not a list'),
    ("conversations_not_list", [{"conversations": {"from": "gpt"}}], 1, '"conversations" is an object, not a list'),
    ("message_not_object", [{"messages": ["hello"]}], 1, "messages[0] is 'hello', not an object"),
    ("message_is_number", [{"messages": [U, 3]}], 1, "messages[1] is a number, not an object"),
    ("message_is_null", [{"messages": [None]}], 1, "messages[0] is null, not an object"),
    ("message_is_list", [{"messages": [[U]]}], 1, "messages[0] is a list, not an object"),
    ("message_nested_500", ['{"messages": [' + _nested(500) + "]}"], 1, "messages[0] is a list, not an object"),
    ("message_without_content", [{"messages": [{"role": "user"}]}], 1,
     "messages[0] is an object with keys role, not an object with role and content"),
    ("turn_without_value", [{"conversations": [{"from": "gpt", "content": "a"}]}], 1, "not an object with from and"),
    ("empty_messages", [{"messages": []}], 1, '"messages" is empty'),
    ("role_is_list", [{"messages": [{"role": ["user"], "content": "q"}]}], 1,
     "messages[0].role is a list, not a string"),
    ("role_is_null", [{"messages": [{"role": None, "content": "q"}]}], 1, "messages[0].role is null, not a string"),
    ("from_is_list", [{"conversations": [{"from": ["human"], "value": "q"}]}], 1,
     "conversations[0].from is a list, not a string"),
    ("from_is_object", [{"conversations": [{"from": {"a": 1}, "value": "q"}]}], 1,
     "conversations[0].from is an object, not a string"),
    ("from_is_bool", [{"conversations": [{"from": True, "value": "q"}]}], 1, "from is true/false, not a string"),
    ("value_is_list", [{"conversations": [{"from": "gpt", "value": ["a"]}]}], 1,
     "conversations[0].value is a list, not a string"),
    ("top_level_array", [[1, 2]], 1, "the line is a list, not a JSON object"),
    ("top_level_string", ['"text"'], 1, "the line is a string, not a JSON object"),
    ("top_level_null", ["null"], 1, "the line is null, not a JSON object"),
    ("top_level_number", ["12"], 1, "the line is a number, not a JSON object"),
    ("text_not_string", [{"text": ["a"]}], 1, '"text" is a list, not a string'),
    ("text_is_object", [{"text": {"a": "b"}}], 1, '"text" is an object, not a string'),
    ("text_is_null", [{"text": None}], 1, '"text" is null, not a string'),
    ("empty_text", ["", "", {"text": "  "}], 3, '"text" is empty'),
    ("completion_not_string", [{"prompt": "q", "completion": 3}], 1, '"completion" is a number'),
    ("prompt_is_list", [{"prompt": ["q"], "completion": "a"}], 1, '"prompt" is a list, not a string'),
    # inputs that made Python's json (or what follows it) raise something other than a clean error
    ("deep_array", [CHAT, "[" * DEEP], 2, "nested too deeply"),
    ("deep_messages", ['{"messages": ' + _nested(DEEP) + "}"], 1, "nested too deeply"),
    ("deep_ignored_key", ['{"text": "a", "x": ' + _nested(DEEP) + "}"], 1, "nested too deeply"),
    ("huge_int", ['{"text": 1' + "0" * 5000 + "}"], 1, "a number with 5,001 digits"),
    ("huge_negative_int_ignored_key", ['{"text": "a", "id": -' + "7" * 5000 + "}"], 1, "a number with 5,000 digits"),
    ("float_overflow", ['{"text": "a", "score": 1e999}'], 1, "the number '1e999' is too large for a float"),
    ("nan", ['{"text": NaN}'], 1, "NaN is not JSON"),
    ("infinity_in_turn", ['{"messages": [{"role": "user", "content": Infinity}]}'], 1, "Infinity is not JSON"),
    ("minus_infinity", ['{"text": "a", "w": -Infinity}'], 1, "-Infinity is not JSON"),
    # json keeps the last of two equal keys: the first conversation would be dropped without a word
    ("key_twice", [CHAT, '{"messages": [], "messages": [{"role": "user", "content": "q"}]}'], 2,
     "the key 'messages' appears twice in one object"),
    ("key_twice_in_turn", ['{"messages": [{"role": "user", "role": "assistant", "content": "a"}]}'], 1,
     "the key 'role' appears twice"),
    ("lone_surrogate_text", ['{"text": "ab\\ud800c"}'], 1, '"text" has a lone surrogate \\ud800 (character 3)'),
    ("lone_low_surrogate", ['{"text": "\\udc00"}'], 1, '"text" has a lone surrogate \\udc00 (character 1)'),
    ("lone_surrogate_content", ['{"messages": [{"role": "assistant", "content": "x\\ud83d"}]}'], 1,
     "messages[0].content has a lone surrogate \\ud83d"),
    ("lone_surrogate_value", ['{"conversations": [{"from": "gpt", "value": "\\ude00"}]}'], 1,
     "conversations[0].value has a lone surrogate"),
    ("lone_surrogate_prompt", ['{"prompt": "\\ud800", "completion": "a"}'], 1, '"prompt" has a lone surrogate'),
    ("lone_surrogate_completion", ['{"prompt": "q", "completion": "\\udfff"}'], 1, '"completion" has a lone'),
    ("lone_surrogate_role", ['{"messages": [{"role": "\\ud800", "content": "a"}]}'], 1, "unknown role '\\ud800'"),
    ("long_role", [{"messages": [{"role": "r" * 10_000, "content": "a"}]}], 1, "unknown role 'rrrr"),
    ("nul_bytes", [CHAT, '{"text": "a\x00"}'], 2, "NUL bytes"),
    ("binary", bytes(range(256)) * 4, 1, "NUL bytes"),
    ("png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00", 1, "bytes are not UTF-8 (byte 1 of the line: b'\\x89')"),
    ("utf16_without_bom", json.dumps(CHAT).encode("utf-16-le") + b"\n\x00", 1, "NUL bytes"),
    ("latin1", b'{"text": "caf\xe9"}\n', 1, "bytes are not UTF-8"),
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
    assert "\n" not in msg and len(msg) < len(str(p)) + 400, msg  # one short line, whatever the record holds
    msg.encode("utf-8")  # printable as it is: data echoed into it is escaped (no lone surrogate)


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


def test_surrogate_pair_bom_mid_file_and_big_ignored_numbers_are_fine(tmp_path, tok):
    bom = b"\xef\xbb\xbf"  # as `cat a.jsonl b.jsonl` leaves it when both were saved with one
    p = _write(tmp_path, bom + b'{"text": "\\ud83d\\ude00", "id": 123456789012345678901234567890, "w": -1.5e300}\r\n'
               + bom + json.dumps(CHAT).encode() + b"\r\n\r\n")
    ex, _ = read_jsonl(p, tok, max_seq_len=64)
    assert (ex[0].ids, ex[0].mask) == tok.render_text("\U0001F600")
    assert (ex[1].ids, ex[1].mask) == tok.render(CHAT["messages"])


def test_missing_assistant_is_fine_when_every_token_is_trained(tmp_path, tok):
    user_only = [{"role": "user", "content": "Tell me a story."}]
    (e,), stats = read_jsonl(_write(tmp_path, [{"messages": user_only}]), tok, train_on="all", max_seq_len=64)
    assert e.ids == tok.render(user_only)[0] and stats.trained_tokens == len(e.ids) - 1


# --- bad files: the message names the file and what it is -----------------------------------------------------

BAD_FILES = [
    ("directory", lambda d: d, "is a directory, not a JSONL file"),
    ("missing", lambda d: d / "nope.jsonl", "cannot read the file (No such file or directory)"),
    ("device", lambda d: Path("/dev/zero"), "is not a regular file"),  # would never end
    ("utf16", lambda d: _write(d, json.dumps(CHAT).encode("utf-16")), "the file is UTF-16 text, not UTF-8"),
    ("utf16_be", lambda d: _write(d, b"\xfe\xff" + json.dumps(CHAT).encode("utf-16-be")), "the file is UTF-16"),
    ("utf32", lambda d: _write(d, json.dumps(CHAT).encode("utf-32")), "the file is UTF-32 text, not UTF-8"),
    ("gzip", lambda d: _write(d, gzip.compress(json.dumps(CHAT).encode())), "the file is gzip-compressed"),
]


@pytest.mark.parametrize("make,what", [b[1:] for b in BAD_FILES], ids=[b[0] for b in BAD_FILES])
def test_bad_files(tmp_path, tok, make, what):
    p = make(tmp_path)
    with pytest.raises(DataError) as e:
        read_jsonl(p, tok, max_seq_len=64)
    assert str(e.value).startswith(f"{p}: {what}"), str(e.value)
    assert e.value.line is None and str(e.value).count(". ") >= 1


@pytest.mark.skipif(os.name != "posix", reason="file modes and /proc are POSIX/Linux")
def test_unreadable_file(tmp_path, tok):
    """A file the user may not read. Root reads any file whatever its mode, so under root (CI) the file is one the
    kernel refuses to read to root too: /proc/self/mem at offset 0 (unmapped: an I/O error)."""
    if os.geteuid() == 0:
        with pytest.raises(DataError, match=r"^/proc/self/mem: cannot read the file \(Input/output error\)\. "):
            read_jsonl("/proc/self/mem", tok, max_seq_len=64)
        return
    p = _write(tmp_path, [CHAT])
    p.chmod(0)
    with pytest.raises(DataError, match=rf"^{p}: cannot read the file \(Permission denied\)\. "):
        read_jsonl(p, tok, max_seq_len=64)


def test_read_error_half_way(tmp_path, tok, monkeypatch):
    p = _write(tmp_path, [CHAT, CHAT])
    real_open = open

    class Failing:  # a disk that fails on the second line
        def __init__(self, *args):
            self.f, self.calls = real_open(*args), 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def readline(self, size):
            self.calls += 1
            if self.calls == 2:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            return self.f.readline(size)

    monkeypatch.setattr(data, "open_regular", lambda path, fifo_ok: Failing(path, "rb"))
    with pytest.raises(DataError, match=rf"^{p}: cannot read the file \(Input/output error\)"):
        read_jsonl(p, tok, max_seq_len=64)


def test_line_over_the_limit_is_named_and_later_lines_keep_their_numbers(tmp_path, tok):
    big = '{"text": "' + "x" * data.MAX_LINE_BYTES + '"}'
    p = _write(tmp_path, [CHAT, big, CHAT, "{bad"])
    with pytest.raises(DataError) as e:
        read_jsonl(p, tok, max_seq_len=64)
    size = len(big.encode())
    assert str(e.value).startswith(f"{p}:2: the line is {size:,} bytes long; the limit is {data.MAX_LINE_BYTES:,}. ")
    assert str(e.value).endswith("(1 more bad lines: 4)")


@pytest.mark.parametrize("over", [0, 1])
@pytest.mark.parametrize("newline", [b"\n", b""])
def test_line_limit_is_exact(tmp_path, tok, monkeypatch, over, newline):
    monkeypatch.setattr(data, "MAX_LINE_BYTES", 100)
    line = b'{"text": "' + b"x" * (100 - 12 + over) + b'"}'
    assert len(line) == 100 + over
    p = _write(tmp_path, b'{"text": "a"}\n' + line + newline + (b'{"text": "b"}' if newline else b""))
    if over:
        with pytest.raises(DataError, match=rf"^{p}:2: the line is 101 bytes long; the limit is 100\. "):
            read_jsonl(p, tok, max_seq_len=64)
    else:
        assert len(read_jsonl(p, tok, max_seq_len=64)[0]) == (3 if newline else 2)


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
    full = [len(tok.render(r["messages"])[0]) for r in (long_answer, long_prompt)]
    assert stats.cut_tokens == sum(n - 20 for n in full) and f"({stats.cut_tokens:,} tokens cut)" in s


def test_a_long_document_is_cut_and_the_cut_counted(tmp_path, tok):
    """A document of over 500k tokens (long-context data): tokenized once, cut to max_seq_len, the cut counted."""
    text = " ".join(f"w{i % 997}" for i in range(300_000))
    p = _write(tmp_path, [{"text": text}])
    ex, stats = read_jsonl(p, tok, max_seq_len=131_072)
    n = len(tok.render_text(text)[0])
    assert n > 500_000 and len(ex[0].ids) == 131_072 and stats.cut_tokens == n - 131_072
    assert f"1 truncated to 131072 tokens ({n - 131_072:,} tokens cut)" in stats.summary()


# --- examples with nothing to train -------------------------------------------------------------------------

def _first_target(tok, messages) -> int:
    """Index of the first trained token of a chat: max_seq_len must be at least this + 1 to keep it."""
    return tok.render(messages)[1].index(True, 1)


@pytest.mark.parametrize("cut", ["one_token", "just_short"])
def test_every_record_dropped_is_an_error(tmp_path, tok, cut):
    need = _first_target(tok, CHAT["messages"]) + 1
    max_len = 1 if cut == "one_token" else need - 1
    p = _write(tmp_path, [CHAT, "", CHAT])
    with pytest.raises(DataError) as e:
        read_jsonl(p, tok, max_seq_len=max_len)
    msg = str(e.value)
    assert msg.startswith(f"{p}: all 2 records were dropped: none has a trained token within max_seq_len ({max_len})")
    assert f"Raise --max-seq-len to at least {need} to keep one" in msg
    assert ("--train-on all" in msg) == (max_len >= 2)  # with 1 token nothing is predicted, whatever is trained
    ex, stats = read_jsonl(p, tok, max_seq_len=need)  # the suggestion is exact: one target each is left
    assert len(ex) == 2 and stats.trained_tokens == 2 and stats.dropped == 0


def test_every_token_trained_needs_two_tokens(tmp_path, tok):
    p = _write(tmp_path, [CHAT])
    with pytest.raises(DataError, match="at least 2 to keep one$"):
        read_jsonl(p, tok, train_on="all", max_seq_len=1)
    (e,), stats = read_jsonl(p, tok, train_on="all", max_seq_len=2)
    assert len(e.ids) == 2 and stats.trained_tokens == 1


def test_held_out_file_all_dropped_is_an_error_too(tmp_path, tok):
    # train.py reads --eval-data with the same call; a held-out split always leaves training one example
    long_prompt = {"messages": [{"role": "user", "content": "word " * 50}, {"role": "assistant", "content": "ok"}]}
    with pytest.raises(DataError, match="the only record was dropped: it has no trained token within max_seq_len"):
        read_jsonl(_write(tmp_path, [long_prompt], "eval.jsonl"), tok, max_seq_len=20)
    ex, _ = read_jsonl(_write(tmp_path, [CHAT]), tok, max_seq_len=64)
    assert split_eval(ex, 0.5, seed=0) == (ex, [])


class OneToken:
    """A tokenizer whose texts render to one token: nothing to predict it from."""
    supports_system = True

    def render_text(self, text):
        return [7], [True]


@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    """The real tokenizer with the medium chat template (system messages left out, no leading <s>)."""
    d = tmp_path_factory.mktemp("medium")
    shutil.copy(TOK_DIR / "tokenizer.json", d / "tokenizer.json")
    shutil.copy(TOK_DIR.parent / "configs/phi3-medium-4k-instruct/tokenizer_config.json", d / "tokenizer_config.json")
    return load_tokenizer(d)


NOTHING_TO_TRAIN = [  # (tokenizer, train_on, a good record or None, the record with nothing to train)
    ("medium", "assistant", CHAT, {"messages": [{"role": "assistant", "content": ""}]}),  # renders to <|end|>
    ("medium", "all", CHAT, {"messages": [{"role": "system", "content": "Be brief."}]}),  # renders to nothing
    ("one_token", "all", None, {"text": "a"}),
]


@pytest.mark.parametrize("which,train_on,good,record", NOTHING_TO_TRAIN,
                         ids=["empty_reply_first", "system_only", "one_token_text"])
def test_record_with_nothing_to_train_is_a_bad_line(tmp_path, request, which, train_on, good, record):
    tok = OneToken() if which == "one_token" else request.getfixturevalue(which)
    if "messages" in record:  # the premise, from the tokenizer itself
        ids, mask = tok.render(record["messages"])
        assert len(ids) <= 1 and not any(mask[1:])
    p = _write(tmp_path, ([good] if good else []) + [record, record])
    first = 2 if good else 1
    with pytest.raises(DataError) as e:
        read_jsonl(p, tok, train_on=train_on, max_seq_len=64)
    assert str(e.value).startswith(f"{p}:{first}: nothing to train: the record renders to ")
    assert str(e.value).endswith(f"(1 more bad lines: {first + 1})")


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

    class EverythingStops:  # a model folder whose generation_config.json calls pad, unk and 0 to 2 stop ids
        pad_id, unk_id, stop_ids = 1, 0, (0, 1, 2, 32000)

    assert pad_token_for(EverythingStops()) == 3


def test_a_fifo_without_a_writer_is_an_empty_file_and_a_pipe_is_read(tmp_path, tok):
    """--data names a FIFO nobody writes to: 'empty', at once (an open() that waits would hang beyond Ctrl-C). A
    pipe with a writer (bash's `--data <(zcat chat.jsonl.gz)`) is read like a file."""
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match="empty"):
        read_jsonl(fifo, tok, max_seq_len=64)
    read_end, write_end = os.pipe()
    os.write(write_end, (json.dumps(CHAT) + "\n").encode())
    os.close(write_end)
    (example,), _ = read_jsonl(f"/dev/fd/{read_end}", tok, max_seq_len=64)
    os.close(read_end)
    assert example.ids == tok.render(CHAT["messages"])[0]


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


def test_system_messages_dropped_by_template_are_counted(tmp_path, tok, medium):
    _, stats = read_jsonl(_write(tmp_path, [CHAT, CHAT]), medium, max_seq_len=64)
    assert stats.system_dropped == 2 and "2 system messages left out" in stats.summary()
    _, stats = read_jsonl(_write(tmp_path, [CHAT]), tok, max_seq_len=64)
    assert stats.system_dropped == 0 and "system" not in stats.summary()


def test_data_error_plain_message():
    e = DataError("whole message")
    assert str(e) == "whole message" and e.line is None
