"""The kernel choices a process made by timing, as a JSON record, and their reuse: reproducible runs.

On tuned problems (16-bit, >= launch.AUTOTUNE_MIN_M tokens, LORA_AUTOTUNE on) the GEMM kind (lora_linear.py,
`_fastest`; LORA_GEMM=auto) and each kernel's config (launch.py, the autotuner) are chosen by timing, once per
process. Other choices round differently, so a resumed run or another torchrun rank could compute other numbers.

    record = tuning_record()     # {"version": 1, "kinds": {key: kind}, "configs": {key: {"BLOCK_M": 128, ...}}}
    use_tuning_record(record)    # later launches take exactly these choices: no timing for those keys

Keys are shapes and flags, never the device index ("dx M_BUCKET=8192 N=3072 K=16384 R=16 DROPOUT=True
dtype=torch.bfloat16"). A record is a stranger's file: it is checked against the shipped kinds and config lists
(ValueError naming what is wrong), and a config is stored as the shipped object it equals; nothing in it runs.
"""
import re

from . import launch
from . import lora_linear as ll

VERSION = 2  # 2: no concat kind ("fwd" keys lost SPARE, "down" keys COPY)
MAX_ENTRIES = 10_000  # a real run has hundreds (shapes x token buckets x dropout on/off)
_KINDS = ("tma", "cublas")  # what `_fastest` can choose, at either site
_KIND_FIELDS = ("M_BUCKET", "N", "K", "R", "DROPOUT", "dtype")
_SITES = ("fwd", "dx")
_BOOL = re.compile("True|False")
_DTYPE = re.compile(r"torch\.(bfloat16|float16)")  # fp32 is never tuned
_INT = re.compile(r"0|[1-9][0-9]{0,9}")  # 0: K of the cuBLAS hybrid's low-rank pass
_PATTERNS = {"DROPOUT": _BOOL, "B_KMAJOR": _BOOL, "dtype": _DTYPE, "DTYPE": _DTYPE}


def tuning_record() -> dict:
    """Every GEMM kind and autotuned config chosen so far in this process (JSON-serializable)."""
    return {"version": VERSION, "kinds": dict(sorted(ll._chosen_kinds.items())),
            "configs": {key: _config_json(cfg) for key, cfg in sorted(launch._best.items())}}


def use_tuning_record(record: dict) -> None:
    """Make later launches use the record's choices (merged over this process's). ValueError if it is not a
    record this code could have written; then nothing is changed."""
    kinds, configs = _validated(record)
    ll._chosen_kinds.update(kinds)
    launch._best.update(configs)
    ll._plans.clear()  # plans hold the kinds and prepared configs chosen before


def _config_json(cfg):
    return {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def _validated(record):
    if type(record) is not dict:
        raise ValueError(f"tuning record: expected a JSON object, got {type(record).__name__}")
    unknown = sorted(repr(k)[:40] for k in record if k not in ("version", "kinds", "configs"))
    if unknown:
        raise ValueError(f"tuning record: unknown field(s) {', '.join(unknown)} (expected version, kinds, configs)")
    version = record.get("version", VERSION)
    if type(version) is not int or version != VERSION:
        raise ValueError(f"tuning record: version {_show(version)} is not {VERSION} (written by other code: "
                         "delete it to choose kernels anew)")
    kinds, configs = record.get("kinds", {}), record.get("configs", {})
    for name, part in (("kinds", kinds), ("configs", configs)):
        if type(part) is not dict:
            raise ValueError(f"tuning record: {name} must be a JSON object, got {type(part).__name__}")
    if len(kinds) + len(configs) > MAX_ENTRIES:
        raise ValueError(f"tuning record: {len(kinds) + len(configs)} entries, more than {MAX_ENTRIES}")
    for key, kind in kinds.items():
        _parse(key, "kinds", lambda head: _KIND_FIELDS if head in _SITES else None)
        if type(kind) is not str or kind not in _KINDS:
            raise ValueError(f"tuning record: kinds[{_show(key)}] = {_show(kind)} is not a GEMM kind for this key "
                             f"(one of {', '.join(_KINDS)})")
    chosen = {}
    for key, cfg in configs.items():
        name, _ = _parse(key, "configs", lambda head: ("dtype",) + tuple(launch._tuned[head].keys)
                         if head in launch._tuned else None)
        chosen[key] = _shipped(name, key, cfg)
    return dict(kinds), chosen


def _parse(key, part, fields_of):
    """(head, {field: value}) of a key "head NAME=value ...", the fields exactly those `fields_of(head)` names."""
    where = f"tuning record: {part}[{_show(key)}]"
    if type(key) is not str or len(key) > 300:
        raise ValueError(f"{where}: not a key this code writes")
    head, *pairs = key.split(" ")
    expected = fields_of(head)
    if expected is None:
        raise ValueError(f"{where}: unknown {'site' if part == 'kinds' else 'kernel'} {_show(head)}")
    fields = dict(pair.partition("=")[::2] for pair in pairs)
    if tuple(pair.partition("=")[0] for pair in pairs) != expected:
        raise ValueError(f"{where}: fields must be {' '.join(f + '=...' for f in expected)}")
    for name, value in fields.items():
        pattern = _PATTERNS.get(name, _INT)  # the rest are sizes
        if not pattern.fullmatch(value) or (pattern is _INT and not _in_range(name, int(value))):
            raise ValueError(f"{where}: {name}={_show(value)} is out of range")
    return head, fields


def _in_range(name, n):
    if name == "M_BUCKET":  # launch.m_bucket: a power of two, at least 16
        return 16 <= n <= 2**31 and n & (n - 1) == 0
    return n < 2**31


def _shipped(name, key, cfg):
    """The shipped config of kernel `name` that `cfg` (a record's JSON) describes, exactly (types too)."""
    if type(cfg) is dict and all(type(v) in (int, bool) for v in cfg.values()):
        for shipped in launch._tuned[name].configs:
            ours = _config_json(shipped)
            if cfg.keys() == ours.keys() and all(type(cfg[k]) is type(v) and cfg[k] == v for k, v in ours.items()):
                return shipped
    raise ValueError(f"tuning record: configs[{_show(key)}] is not one of kernel {name!r}'s shipped configs "
                     "(kernels/launch.py): the record was written by other code; delete it to tune anew")


def _show(value, limit=80):
    """A short repr of a stranger's value for a message."""
    text = repr(value) if type(value) in (str, int, bool, float) or value is None else type(value).__name__
    return text if len(text) <= limit else text[:limit] + "..."
