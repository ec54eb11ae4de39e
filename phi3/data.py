"""JSONL training data: read + validate every record, render to (ids, mask), batch with or without packing.

    examples, stats = read_jsonl("chat.jsonl", tok, train_on="assistant", max_seq_len=2048)
    print(stats.summary())
    batches = make_batches(examples, batch_size=4, max_seq_len=2048, pad_id=pad_token_for(tok),
                           packing=True, shuffle=True, seed=0, epoch=epoch)

One JSON object per line, blank lines skipped; the format is detected per record (first match wins, other keys
are ignored, so {"prompt", "prompt_id", "messages"} rows of ultrachat read as messages):
  {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
  {"conversations": [{"from": "system"|"human"|"user"|"gpt"|"assistant", "value": str}, ...]}   (ShareGPT)
  {"prompt": str, "completion": str}                     (a one-turn chat: the completion is trained)
  {"text": str}                                          (plain language modelling: every token trained)
Labels are shifted here: Batch.labels[:, t] is the target for position t (ids[t+1] if mask[t+1], else -100).
"""
from __future__ import annotations

import json
from bisect import bisect_left, insort
from dataclasses import dataclass

import numpy as np
import torch

IGNORE = -100
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
_FORMATS = '{"messages": [...]}, {"conversations": [...]}, {"prompt", "completion"} or {"text"}'


class DataError(ValueError):
    """Bad training data. Message: "path:line: what is wrong. what to do" (line left out when not about one)."""

    def __init__(self, path, line: int | None = None, what: str | None = None, todo: str = ""):
        if what is None:  # DataError("a whole message")
            self.path, self.line = None, None
            super().__init__(path)
            return
        self.path, self.line = str(path), line
        super().__init__(f"{path}:{line}: {what}. {todo}" if line else f"{path}: {what}. {todo}")


@dataclass
class Example:
    ids: list[int]
    mask: list[bool]  # mask[i]: token i is a training target (predicted from position i-1)


@dataclass
class DataStats:
    examples: int = 0        # examples returned
    tokens: int = 0          # their tokens, after truncation
    trained_tokens: int = 0  # their target tokens (mask[1:]), after truncation
    truncated: int = 0       # records cut to max_seq_len (including the dropped ones)
    dropped: int = 0         # truncated records left with no target token at all: not returned
    system_dropped: int = 0  # system messages the checkpoint's template leaves out (older mini / medium)
    max_seq_len: int | None = None

    def summary(self) -> str:
        share = 100.0 * self.trained_tokens / max(self.tokens, 1)
        s = f"{self.examples:,} examples, {self.tokens:,} tokens, {self.trained_tokens:,} trained ({share:.1f}%), "
        if self.max_seq_len is None:
            s += "not truncated"
        else:
            s += f"{self.truncated:,} truncated to {self.max_seq_len} tokens"
        if self.dropped:
            s += (f", {self.dropped:,} dropped (no trained token left within {self.max_seq_len} tokens; "
                  f"raise max_seq_len to keep them)")
        if self.system_dropped:
            s += f", {self.system_dropped:,} system messages left out (this checkpoint's chat template has none)"
        return s


# --- reading + validation -----------------------------------------------------------------------------------

def _messages(rec: dict) -> tuple[str, object]:
    """(kind, payload) for one record, or raise ValueError("what is wrong", "what to do")."""
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list):
            raise ValueError(f'"messages" is a {type(msgs).__name__}, not a list',
                             'Write "messages": [{"role": "user", "content": "..."}, ...]')
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"messages[{i}] is {json.dumps(m)[:80]}, not an object with role and content",
                                 'Write each message as {"role": "user", "content": "..."}')
            if m["role"] not in ("system", "user", "assistant"):
                raise ValueError(f"messages[{i}] has unknown role {m['role']!r}",
                                 'Use "system", "user" or "assistant"')
            out.append({"role": m["role"], "content": m["content"]})
        return "chat", _check_chat(out, "messages", "content")
    if "conversations" in rec:
        conv = rec["conversations"]
        if not isinstance(conv, list):
            raise ValueError(f'"conversations" is a {type(conv).__name__}, not a list',
                             'Write "conversations": [{"from": "human", "value": "..."}, ...]')
        out = []
        for i, m in enumerate(conv):
            if not isinstance(m, dict) or "from" not in m or "value" not in m:
                raise ValueError(f"conversations[{i}] is {json.dumps(m)[:80]}, not an object with from and value",
                                 'Write each turn as {"from": "human", "value": "..."}')
            if m["from"] not in _SHAREGPT_ROLES:
                raise ValueError(f"conversations[{i}] has unknown role (from) {m['from']!r}",
                                 f"Use one of {', '.join(repr(r) for r in _SHAREGPT_ROLES)}")
            out.append({"role": _SHAREGPT_ROLES[m["from"]], "content": m["value"]})
        return "chat", _check_chat(out, "conversations", "value")
    if "prompt" in rec and "completion" in rec:
        for k in ("prompt", "completion"):
            if not isinstance(rec[k], str):
                raise ValueError(f'"{k}" is a {type(rec[k]).__name__}, not a string', f'Make "{k}" a string')
        return "completion", (rec["prompt"], rec["completion"])
    if "text" in rec:
        if not isinstance(rec["text"], str):
            raise ValueError(f'"text" is a {type(rec["text"]).__name__}, not a string', 'Make "text" a string')
        if not rec["text"].strip():
            raise ValueError('"text" is empty', "Remove the record or give it some text")
        return "text", rec["text"]
    keys = ", ".join(sorted(rec)) or "none"
    raise ValueError(f"unknown record format (keys found: {keys})", f"Expected one of {_FORMATS}")


def _check_chat(msgs: list[dict], field: str, content_key: str) -> list[dict]:
    if not msgs:
        raise ValueError(f'"{field}" is empty', "Give at least one user and one assistant turn")
    for i, m in enumerate(msgs):
        if not isinstance(m["content"], str):
            raise ValueError(f"{field}[{i}].{content_key} is a {type(m['content']).__name__}, not a string",
                             f"Make every {content_key} a string")
    if not any(m["role"] == "assistant" for m in msgs):
        raise ValueError(f'"{field}" has no assistant turn, so nothing would be trained',
                         "Add the assistant's reply, or use {\"text\": ...} to train on the whole text")
    return msgs


def _parse(path: str) -> list[tuple[int, str, object]]:
    """Validate every line; return (line number, kind, payload) or raise one DataError naming the first bad line."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(path, None, f"cannot read the file ({e.strerror})", "Check the --data path") from None
    records, errors = [], []
    for n, line in enumerate(raw.split(b"\n"), start=1):
        if n == 1 and line.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte order mark
            line = line[3:]
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            errors.append((n, f"bytes are not UTF-8 (byte {e.start + 1} of the line: {line[e.start:e.start + 1]!r})",
                           "Re-save the file as UTF-8"))
            continue
        if not text.strip():
            continue
        try:
            rec = json.loads(text)
        except json.JSONDecodeError as e:
            errors.append((n, f"invalid JSON ({e.msg} at column {e.colno})",
                           "Write exactly one JSON object per line (JSONL)"))
            continue
        if not isinstance(rec, dict):
            errors.append((n, f"the line is a JSON {type(rec).__name__}, not an object", f"Write one of {_FORMATS}"))
            continue
        try:
            records.append((n, *_messages(rec)))
        except ValueError as e:
            errors.append((n, *e.args))
    if errors:
        n, what, todo = errors[0]
        if len(errors) > 1:
            more = ", ".join(str(e[0]) for e in errors[1:6]) + (", ..." if len(errors) > 6 else "")
            todo += f" ({len(errors) - 1} more bad lines: {more})"
        raise DataError(path, n, what, todo)
    if not records:
        raise DataError(path, None, "no records (the file is empty or has only blank lines)",
                        f"Write one JSON object per line: {_FORMATS}")
    return records


def read_jsonl(path, tokenizer, train_on: str = "assistant", max_seq_len: int | None = None
               ) -> tuple[list[Example], DataStats]:
    """Read, validate and tokenize a JSONL file. train_on="assistant": chats train the assistant turns (+ <|end|>),
    "all": every token. Examples longer than max_seq_len are cut (counted); one left without any target is dropped
    (counted, named in the summary)."""
    if train_on not in ("assistant", "all"):
        raise ValueError(f'train_on must be "assistant" or "all", got {train_on!r}')
    path = str(path)
    stats = DataStats(max_seq_len=max_seq_len)
    examples = []
    for n, kind, payload in _parse(path):
        if kind == "chat":
            ids, mask = tokenizer.render(payload)
            if not getattr(tokenizer, "supports_system", True):
                stats.system_dropped += sum(m["role"] == "system" for m in payload)
        elif kind == "completion":
            ids, mask = tokenizer.render_completion(*payload)
        else:
            ids, mask = tokenizer.render_text(payload)
        if train_on == "all":
            mask = [True] * len(ids)
        if max_seq_len is not None and len(ids) > max_seq_len:
            ids, mask = ids[:max_seq_len], mask[:max_seq_len]
            stats.truncated += 1
            if not any(mask[1:]):
                stats.dropped += 1
                continue
        examples.append(Example(ids, mask))
        stats.examples += 1
        stats.tokens += len(ids)
        stats.trained_tokens += sum(mask[1:])
    return examples, stats


def pad_token_for(tokenizer) -> int:
    """Id to pad with: tokenizer.pad_id unless it is a stop id (Phi-3's pad is <|endoftext|>, a stop id, so a model
    trained to see it could learn to end early); then <unk> (0), as Microsoft's fine-tuning recipe does."""
    stops = set(tokenizer.stop_ids)
    for i in (tokenizer.pad_id, getattr(tokenizer, "unk_id", None), 0):
        if i is not None and i not in stops:
            return i
    raise ValueError("no padding id that is not a stop id")


def split_eval(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic split; eval gets round(fraction * n) examples (at least 1 if fraction > 0 and n >= 2), train
    keeps at least one. Both keep the file order."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"eval fraction must be in [0, 1), got {fraction}")
    n = len(examples)
    k = 0 if fraction == 0 or n < 2 else min(max(1, round(fraction * n)), n - 1)
    chosen = set(np.random.default_rng(seed).permutation(n)[:k].tolist())
    return ([e for i, e in enumerate(examples) if i not in chosen], [e for i, e in enumerate(examples) if i in chosen])


# --- batching -----------------------------------------------------------------------------------------------

@dataclass
class Batch:
    input_ids: torch.Tensor            # (B, T) long
    labels: torch.Tensor               # (B, T) long, shifted: target of position t, -100 where not trained/padding
    position_ids: torch.Tensor         # (B, T) long, restarting at 0 for each packed document
    document_ids: torch.Tensor | None  # (B, T) long, 0..k-1 per row for its packed documents, -1 on padding
    trained_tokens: int                # (labels != -100).sum()


def _pack(lengths: list[int], order: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: items (indices into lengths) visited longest first, ties in `order`; each goes into the
    fullest bin it still fits in. Bins are kept in buckets by free space, so this is O(n log capacity)."""
    rank = {i: r for r, i in enumerate(order)}
    items = sorted(order, key=lambda i: (-lengths[i], rank[i]))
    bins: list[list[int]] = []
    free_sizes: list[int] = []              # sorted distinct free sizes that have bins
    by_free: dict[int, list[int]] = {}      # free size -> bin indices
    for i in items:
        L = lengths[i]
        j = bisect_left(free_sizes, L)
        if j < len(free_sizes):
            free = free_sizes[j]
            b = by_free[free].pop()
            if not by_free[free]:
                del by_free[free], free_sizes[j]
        else:
            free, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        free -= L
        if free > 0:
            if free not in by_free:
                by_free[free] = []
                insort(free_sizes, free)
            by_free[free].append(b)
    return bins


def _row(docs: list[Example], T: int, pad_id: int, packed: bool):
    ids = np.full(T, pad_id, dtype=np.int64)
    labels = np.full(T, IGNORE, dtype=np.int64)
    pos = np.arange(T, dtype=np.int64)
    doc = np.full(T, -1, dtype=np.int64)
    o = 0
    for d, e in enumerate(docs):
        n = len(e.ids)
        x = np.asarray(e.ids, dtype=np.int64)
        ids[o:o + n] = x
        # labels[t] = ids[t+1] where mask[t+1]; the document's last token predicts nothing (no boundary crossing)
        labels[o:o + n - 1] = np.where(np.asarray(e.mask[1:], dtype=bool), x[1:], IGNORE)
        pos[o:o + n] = np.arange(n)
        doc[o:o + n] = d
        o += n
    if packed:
        pos[o:] = np.arange(T - o)  # padding: its own "document" -1, positions from 0
    return ids, labels, pos, doc


def make_batches(examples: list[Example], batch_size: int, max_seq_len: int, pad_id: int, packing: bool,
                 shuffle: bool, seed: int, epoch: int = 0) -> list[Batch]:
    """Batches for one epoch, deterministic given (seed, epoch). Unpacked: one example per row, right-padded to the
    longest in the batch. Packed: rows of exactly max_seq_len holding whole examples (best-fit decreasing), with
    document_ids and restarting position_ids; the attention must not cross documents (use document_ids)."""
    if not examples:
        raise ValueError("no examples to batch")
    too_long = max(len(e.ids) for e in examples)
    if too_long > max_seq_len:
        raise ValueError(f"an example has {too_long} tokens > max_seq_len {max_seq_len}; read_jsonl truncates")
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(examples)).tolist() if shuffle else list(range(len(examples)))
    if packing:
        rows = [[examples[i] for i in b] for b in _pack([len(e.ids) for e in examples], order, max_seq_len)]
        if shuffle:  # packing sorted by length; mix long and short rows again
            rows = [rows[i] for i in rng.permutation(len(rows)).tolist()]
    else:
        rows = [[examples[i]] for i in order]
    batches = []
    for s in range(0, len(rows), batch_size):
        group = rows[s:s + batch_size]
        T = max_seq_len if packing else max(len(r[0].ids) for r in group)
        cols = list(zip(*(_row(r, T, pad_id, packing) for r in group)))
        ids, labels, pos, doc = (torch.from_numpy(np.stack(c)) for c in cols)
        batches.append(Batch(ids, labels, pos, doc if packing else None, int((labels != IGNORE).sum())))
    return batches
