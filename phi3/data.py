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
Every line is checked, then rendered; bad lines (any wrong JSON type, NaN, a lone surrogate, a line over
MAX_LINE_BYTES, nothing to train, ...) raise one DataError naming the first and counting the others.
Labels are shifted here: Batch.labels[:, t] is the target for position t (ids[t+1] if mask[t+1], else -100).
"""
from __future__ import annotations

import json
import math
from bisect import bisect_left, insort
from dataclasses import dataclass

import numpy as np
import torch

from phi3.config import DuplicateKey, NotARegularFile, open_regular, unique_keys

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
    cut_tokens: int = 0      # tokens truncation removed (a dropped record's kept part is not counted here)
    dropped: int = 0         # truncated records left with no target token at all: not returned (all: DataError)
    system_dropped: int = 0  # system messages the checkpoint's template leaves out (older mini / medium)
    max_seq_len: int | None = None

    def summary(self) -> str:
        share = 100.0 * self.trained_tokens / max(self.tokens, 1)
        s = f"{self.examples:,} examples, {self.tokens:,} tokens, {self.trained_tokens:,} trained ({share:.1f}%), "
        if self.max_seq_len is None:
            s += "not truncated"
        else:
            s += f"{self.truncated:,} truncated to {self.max_seq_len} tokens"
            if self.truncated:
                s += f" ({self.cut_tokens:,} tokens cut)"
        if self.dropped:
            s += (f", {self.dropped:,} dropped (no trained token left within {self.max_seq_len} tokens; "
                  f"raise max_seq_len to keep them)")
        if self.system_dropped:
            s += f", {self.system_dropped:,} system messages left out (this checkpoint's chat template has none)"
        return s


# --- reading + validation -----------------------------------------------------------------------------------

# Longer lines are refused: tokenizing costs ~1 s per MB, and all but max_seq_len tokens of it would be cut anyway.
MAX_LINE_BYTES = 16 << 20
_CHAT_FIELDS = {  # list field -> (role key, text key, its role names -> ours, one turn as written)
    "messages": ("role", "content", {r: r for r in ("system", "user", "assistant")},
                 '{"role": "user", "content": "..."}'),
    "conversations": ("from", "value", _SHAREGPT_ROLES, '{"from": "human", "value": "..."}'),
}
_NOT_TEXT = {  # how files that are not UTF-8 text start -> what they are (UTF-32 first: it starts like UTF-16)
    b"\xff\xfe\x00\x00": "UTF-32 text", b"\x00\x00\xfe\xff": "UTF-32 text", b"\xff\xfe": "UTF-16 text",
    b"\xfe\xff": "UTF-16 text", b"\x1f\x8b": "gzip-compressed", b"BZh": "bzip2-compressed",
    b"\xfd7zXZ\x00": "xz-compressed", b"\x28\xb5\x2f\xfd": "zstd-compressed", b"PK\x03\x04": "a zip archive",
    b"PAR1": "a Parquet file",
}


class _Bad(Exception):
    """One bad line: args = (what is wrong, what to do)."""


class _Errors:
    """The first bad line of a file, in full, and how many others (the first few by number)."""

    def __init__(self):
        self.first, self.others, self.count = None, [], 0

    def add(self, n: int, what: str, todo: str):
        if self.first is None:
            self.first = (n, what, todo)
            return
        self.count += 1
        if len(self.others) < 5:
            self.others.append(n)

    def raise_first(self, path: str):
        if self.first is None:
            return
        n, what, todo = self.first
        if self.count:
            more = ", ".join(map(str, self.others)) + (", ..." if self.count > len(self.others) else "")
            todo += f" ({self.count} more bad lines: {more})"
        raise DataError(path, n, what, todo)


def _kind(v) -> str:
    """The JSON name of a parsed value's type (None, the only other one json.loads makes, is null)."""
    if isinstance(v, bool):
        return "true/false"
    return {str: "a string", int: "a number", float: "a number", list: "a list", dict: "an object"}.get(type(v), "null")


def _quote(s: str, n: int = 40) -> str:
    """s for a one-line message: cut to n characters; repr escapes newlines, control characters, lone surrogates."""
    r = repr(s[:n])
    return r if len(s) <= n else r[:-1] + "..." + r[-1]


def _keys(d: dict) -> str:
    names = [k if k.isprintable() and len(k) <= 40 else _quote(k) for k in sorted(d)[:10]]
    return ", ".join(names) + (f", ... ({len(d):,} keys)" if len(d) > 10 else "")


def _show(v) -> str:
    """A short description of any parsed value (never its whole text: it may be huge or deeply nested)."""
    if isinstance(v, str):
        return _quote(v)
    if isinstance(v, dict):
        return f"an object with keys {_keys(v)}" if v else "an empty object"
    return _kind(v)


# json.loads hooks: Python reads NaN/Infinity (not JSON) and 1e999 (as inf), and raises a bare ValueError on an
# integer of more than sys.get_int_max_str_digits() digits. No format uses a number, so these only name the line.
def _int(s: str) -> int:
    try:
        return int(s)
    except ValueError:
        raise _Bad(f"a number with {len(s.lstrip('-')):,} digits, more than Python reads",
                   "Write it as a string, or leave it out") from None


def _float(s: str) -> float:
    x = float(s)
    if math.isinf(x):
        raise _Bad(f"the number {_quote(s)} is too large for a float", "Write it as a string, or leave it out")
    return x


def _constant(s: str):
    raise _Bad(f"{s} is not JSON (only JavaScript and Python write it)", f'Write null or the string "{s}" instead')


def _text(v, where: str) -> str:
    """v if it is a string the tokenizer can take, else _Bad."""
    if not isinstance(v, str):
        raise _Bad(f"{where} is {_kind(v)}, not a string", f"Make {where} a string")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:  # "\ud800" without its other half: valid JSON, but not a character
        raise _Bad(f"{where} has a lone surrogate \\u{ord(v[e.start]):04x} (character {e.start + 1}), half of a "
                   "UTF-16 pair", "Write the character itself, or both \\uXXXX halves of its pair") from None
    return v


def _chat(turns, field: str, train_on: str) -> list[dict]:
    role_key, text_key, roles, turn = _CHAT_FIELDS[field]
    if not isinstance(turns, list):
        raise _Bad(f'"{field}" is {_kind(turns)}, not a list', f'Write "{field}": [{turn}, ...]')
    if not turns:
        raise _Bad(f'"{field}" is empty', "Give at least one user and one assistant turn")
    names = ", ".join(repr(r) for r in roles)
    out = []
    for i, m in enumerate(turns):
        where = f"{field}[{i}]"
        if not isinstance(m, dict) or role_key not in m or text_key not in m:
            raise _Bad(f"{where} is {_show(m)}, not an object with {role_key} and {text_key}",
                       f"Write each turn as {turn}")
        role = m[role_key]
        if not isinstance(role, str):  # also keeps a list/object from being looked up in `roles` (unhashable)
            raise _Bad(f"{where}.{role_key} is {_kind(role)}, not a string", f"Use one of {names}")
        if role not in roles:
            label = "role" if role_key == "role" else f"role ({role_key})"
            raise _Bad(f"{where} has unknown {label} {_quote(role)}", f"Use one of {names}")
        out.append({"role": roles[role], "content": _text(m[text_key], f"{where}.{text_key}")})
    if train_on == "assistant" and not any(m["role"] == "assistant" for m in out):
        raise _Bad(f'"{field}" has no assistant turn, so nothing would be trained',
                   "Add the assistant's reply, or use {\"text\": ...} to train on the whole text")
    return out


def _record(rec: dict, train_on: str) -> tuple[str, object]:
    """(kind, payload) for one record, or _Bad."""
    for field in _CHAT_FIELDS:
        if field in rec:
            return "chat", _chat(rec[field], field, train_on)
    if "prompt" in rec and "completion" in rec:
        return "completion", (_text(rec["prompt"], '"prompt"'), _text(rec["completion"], '"completion"'))
    if "text" in rec:
        text = _text(rec["text"], '"text"')
        if not text.strip():
            raise _Bad('"text" is empty', "Remove the record or give it some text")
        return "text", text
    raise _Bad(f"unknown record format (keys found: {_keys(rec) or 'none'})", f"Expected one of {_FORMATS}")


def _decode(line: bytes) -> dict | None:
    """The JSON object on one line (without its newline), None for a blank line, or _Bad."""
    if b"\x00" in line:  # never in JSON text, even inside a string
        raise _Bad("the line holds NUL bytes (binary data, or UTF-16/32 text)", "Re-save the file as UTF-8 JSONL")
    if line.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark: file start, or where files were concatenated
        line = line[3:]
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Bad(f"bytes are not UTF-8 (byte {e.start + 1} of the line: {line[e.start:e.start + 1]!r})",
                   "Re-save the file as UTF-8") from None
    if not text.strip():
        return None
    try:
        rec = json.loads(text, parse_int=_int, parse_float=_float, parse_constant=_constant,
                         object_pairs_hook=unique_keys)
    except DuplicateKey as e:  # json would keep the last of the two without a word
        raise _Bad(f"the key {_quote(e.args[0])} appears twice in one object", "Keep one of them") from None
    except json.JSONDecodeError as e:
        raise _Bad(f"invalid JSON ({e.msg} at column {e.colno})",
                   "Write exactly one JSON object per line (JSONL)") from None
    except RecursionError:  # '[' * 100000: json's C parser stops at Python's recursion limit
        raise _Bad("the JSON is nested too deeply to read", f"Write one of {_FORMATS}") from None
    if not isinstance(rec, dict):
        raise _Bad(f"the line is {_kind(rec)}, not a JSON object", f"Write one of {_FORMATS}")
    return rec


def _lines(path: str):
    """(line number, its bytes without the newline or None when over MAX_LINE_BYTES, its length), read a line at a
    time so a huge file or one without newlines is never held whole. Problems with the file itself raise DataError."""
    todo = "Check the path and the file's permissions"
    try:
        f = open_regular(path, fifo_ok=True)  # a pipe (`--data <(zcat x.gz)`) is data; a device may never end
    except IsADirectoryError:
        raise DataError(path, None, "is a directory, not a JSONL file", "Pass the path of the .jsonl file") from None
    except NotARegularFile:
        raise DataError(path, None, "is not a regular file", "Pass the path of a .jsonl file") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL character in the path
        raise DataError(path, None, f"cannot read the file ({getattr(e, 'strerror', None) or e})", todo) from None
    try:
        with f:
            n = 0
            while line := f.readline(MAX_LINE_BYTES + 1):
                n += 1
                if n == 1:
                    kind = next((k for magic, k in _NOT_TEXT.items() if line.startswith(magic)), None)
                    if kind:
                        fix = "Re-save it as UTF-8" if kind.endswith("text") else "Decompress or convert it first"
                        raise DataError(path, None, f"the file is {kind}, not UTF-8 JSONL", fix)
                if line.endswith(b"\n"):
                    line = line[:-1]
                elif len(line) > MAX_LINE_BYTES:
                    size = len(line)
                    while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
                        size += len(rest)
                    yield n, None, size + len(rest.rstrip(b"\n"))
                    continue
                yield n, line, len(line)
    except OSError as e:
        raise DataError(path, None, f"cannot read the file ({e.strerror or e})", todo) from None


def _parse(path: str, train_on: str) -> list[tuple[int, str, object]]:
    """Validate every line; return (line number, kind, payload) or raise one DataError naming the first bad line."""
    records, errors = [], _Errors()
    for n, line, size in _lines(path):
        try:
            if line is None:
                raise _Bad(f"the line is {size:,} bytes long; the limit is {MAX_LINE_BYTES:,}",
                           "Split it into several records (each is cut to max_seq_len tokens, so the rest of this "
                           "one would be lost anyway)")
            rec = _decode(line)
            if rec is not None:
                records.append((n, *_record(rec, train_on)))
        except _Bad as e:
            errors.add(n, *e.args)
    errors.raise_first(path)
    if not records:
        raise DataError(path, None, "no records (the file is empty or has only blank lines)",
                        f"Write one JSON object per line: {_FORMATS}")
    return records


def read_jsonl(path, tokenizer, train_on: str = "assistant", max_seq_len: int | None = None
               ) -> tuple[list[Example], DataStats]:
    """Read, validate and tokenize a JSONL file. train_on="assistant": chats train the assistant turns (+ <|end|>),
    "all": every token. A record that renders with no target at all is a bad line. Examples longer than
    max_seq_len are cut (counted); one left without any target is dropped (counted, named in the summary), and
    DataError is raised when that leaves no example."""
    if train_on not in ("assistant", "all"):
        raise ValueError(f'train_on must be "assistant" or "all", got {train_on!r}')
    if max_seq_len is not None and max_seq_len < 1:
        raise ValueError(f"max_seq_len must be at least 1, got {max_seq_len}")
    path = str(path)
    stats = DataStats(max_seq_len=max_seq_len)
    examples, errors = [], _Errors()
    need = None  # the smallest max_seq_len that would keep one of the dropped records
    for n, kind, payload in _parse(path, train_on):
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
        # mask[0] is never a target: nothing before the first token predicts it (e.g. a chat that opens with an
        # empty assistant turn under the medium template renders to the single token <|end|>)
        if not any(mask[1:]):
            errors.add(n, f"nothing to train: the record renders to {len(ids)} token(s) and none after the first "
                          "is trained", "Remove the record, or give it more text to train on")
            continue
        if max_seq_len is not None and len(ids) > max_seq_len:
            stats.truncated += 1
            stats.cut_tokens += len(ids) - max_seq_len
            first = mask.index(True, 1)
            ids, mask = ids[:max_seq_len], mask[:max_seq_len]
            if first >= max_seq_len:
                stats.dropped += 1
                need = first + 1 if need is None else min(need, first + 1)
                continue
        examples.append(Example(ids, mask))
        stats.examples += 1
        stats.tokens += len(ids)
        stats.trained_tokens += sum(mask[1:])
    errors.raise_first(path)
    if not examples:
        todo = f"Raise --max-seq-len to at least {need} to keep one"
        if train_on == "assistant" and max_seq_len >= 2:
            todo += ", or train on every token with --train-on all"
        who = ("the only record was dropped: it has no" if stats.dropped == 1
               else f"all {stats.dropped:,} records were dropped: none has a")
        raise DataError(path, None, f"{who} trained token within max_seq_len ({max_seq_len}) tokens", todo)
    return examples, stats


def pad_token_for(tokenizer) -> int:
    """Id to pad with: tokenizer.pad_id unless it is a stop id (Phi-3's pad is <|endoftext|>, a stop id, so a model
    trained to see it could learn to end early); then <unk> (0), as Microsoft's fine-tuning recipe does; then the
    tokenizer's last id, an added special token that text hardly ever holds (Phi-4-mini's pad and unk are its stop
    id <|endoftext|>: it pads with <|tag|>), not id 0, which is "!" in byte-level vocabularies and would be taken
    for padding where tokens are counted (train.py counts ids != pad); then the first id that stops nothing.
    Padding is never trained nor attended to, so any such id pads correctly, whatever a model folder's generation
    settings call a stop."""
    stops = set(tokenizer.stop_ids)
    vocab_size = getattr(tokenizer, "vocab_size", None)
    last = vocab_size - 1 if vocab_size else None
    for i in (tokenizer.pad_id, getattr(tokenizer, "unk_id", None), last):
        if i is not None and i not in stops:
            return i
    return next(i for i in range(len(stops) + 1) if i not in stops)


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
