"""Tests for examples/chat_metric.py and the committed demo chat data (examples/chat.jsonl, chat_eval.jsonl).

    python -m pytest tests/test_chat_metric.py
"""

import importlib.util
import json
import re
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
_spec = importlib.util.spec_from_file_location("chat_metric", EXAMPLES / "chat_metric.py")
chat_metric = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(chat_metric)
score, summarize, normalize = chat_metric.score, chat_metric.summarize, chat_metric.normalize


# ---------------------------------------------------------------- metric

def test_normalize_drops_case_punctuation_articles():
    assert normalize("The  Cat, an animal!") == "cat animal"
    assert normalize('As a noun, "cat" means: a pet.') == "as noun cat means pet"


def test_identical_is_perfect():
    s = score("A small domestic cat.", "a small domestic cat")
    assert s["f1"] == 1.0 and s["exact_match"] == 1.0


def test_disjoint_is_zero():
    s = score("big red dog", "small blue whale")
    assert s["f1"] == 0.0 and s["exact_match"] == 0.0


def test_partial_overlap_value():
    # pred: small domestic cat (3), ref: small wild cat animal (4); common = 2 -> P=2/3, R=1/2, F1=4/7
    s = score("small domestic cat", "small wild cat animal")
    assert s["precision"] == pytest.approx(2 / 3)
    assert s["recall"] == pytest.approx(1 / 2)
    assert s["f1"] == pytest.approx(4 / 7)
    assert s["exact_match"] == 0.0


def test_repeated_words_count_once_per_occurrence():
    # multiset overlap: "cat cat cat" vs "cat" shares one token -> P=1/3, R=1
    s = score("cat cat cat", "cat")
    assert s["f1"] == pytest.approx(2 * (1 / 3) / (1 / 3 + 1))


def test_word_order_does_not_change_f1_but_breaks_exact_match():
    s = score("fur soft thick", "thick soft fur")
    assert s["f1"] == 1.0 and s["exact_match"] == 0.0


def test_empty_strings():
    assert score("", "")["f1"] == 1.0
    assert score("", "cat")["f1"] == 0.0
    assert score("cat", "")["f1"] == 0.0
    assert score("the", "a")["exact_match"] == 1.0  # both normalise to nothing


def test_summarize_means():
    out = summarize([score("a b", "a b"), score("x", "y")])
    assert out["n"] == 2
    assert out["f1"] == pytest.approx(0.5)
    assert out["exact_match"] == pytest.approx(0.5)
    assert summarize([]) == {"n": 0}


# ---------------------------------------------------------------- committed data

ASKED = re.compile(r'"([^"]+)"')


def _load(name):
    path = EXAMPLES / name
    if not path.exists():
        pytest.skip(f"{path} missing: python examples/make_data.py")
    records = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        rec = json.loads(line)
        msgs = rec["messages"]
        assert isinstance(msgs, list) and len(msgs) >= 2, (name, i)
        for m in msgs:
            assert set(m) == {"role", "content"}, (name, i)
            assert m["role"] in ("system", "user", "assistant"), (name, i)
            assert isinstance(m["content"], str) and m["content"].strip(), (name, i)
        assert msgs[-1]["role"] == "assistant", (name, i)
        assert msgs[-2]["role"] == "user", (name, i)
        assert len(msgs[-1]["content"].split()) <= 40, (name, i)
        records.append(rec)
    return records


def _asked_word(rec):
    user = [m for m in rec["messages"] if m["role"] == "user"][-1]["content"]
    return ASKED.search(user).group(1).lower()


def test_chat_files_valid_and_disjoint():
    train, held = _load("chat.jsonl"), _load("chat_eval.jsonl")
    assert 1000 <= len(train) <= 5000 and 100 <= len(held) <= 500
    train_words, eval_words = {_asked_word(r) for r in train}, {_asked_word(r) for r in held}
    assert len(eval_words) == len(held)  # one conversation per held-out word
    assert not train_words & eval_words, sorted(train_words & eval_words)[:10]
    # the answer is about the asked word
    for rec in train + held:
        assert f'"{_asked_word(rec)}" means:' in rec["messages"][-1]["content"]
    size = (EXAMPLES / "chat.jsonl").stat().st_size + (EXAMPLES / "chat_eval.jsonl").stat().st_size
    assert size < 1_000_000
