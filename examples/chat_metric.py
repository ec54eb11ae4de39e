"""Automatic metric for the WordNet chat demo: SQuAD-style token F1 and exact match.

    from examples.chat_metric import score, summarize      # or: import chat_metric (from examples/)
    s = [score(reply, ref) for reply, ref in zip(replies, refs)]
    summarize(s)   # {'n': 200, 'f1': 0.41, 'exact_match': 0.12}

Normalisation (as in the SQuAD v1.1 evaluation script): lower case, drop punctuation, drop the articles
a / an / the, collapse whitespace. F1 is over the multiset of remaining words. Pure Python.
"""

import re
import string
from collections import Counter

_PUNCT = set(string.punctuation)


def normalize(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def score(reply: str, reference: str) -> dict:
    """{'f1', 'precision', 'recall', 'exact_match'} of one model reply against one reference answer."""
    pred, ref = normalize(reply).split(), normalize(reference).split()
    em = float(pred == ref)
    if not pred or not ref:  # both empty: perfect; one empty: nothing overlaps
        return {"f1": em, "precision": em, "recall": em, "exact_match": em}
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return {"f1": 0.0, "precision": 0.0, "recall": 0.0, "exact_match": em}
    p, r = common / len(pred), common / len(ref)
    return {"f1": 2 * p * r / (p + r), "precision": p, "recall": r, "exact_match": em}


def summarize(scores) -> dict:
    """Mean of every key over a list of score() dicts, plus 'n'."""
    scores = list(scores)
    out = {"n": len(scores)}
    for key in (scores[0] if scores else {}):
        out[key] = sum(s[key] for s in scores) / len(scores)
    return out
