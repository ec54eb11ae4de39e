"""Reproducible kernel choices for a training run.

On a GPU the LoRA kernels choose, per problem shape, a GEMM kind and block sizes by timing them (kernels/launch.py),
and different choices round differently. So a run makes every choice once, before its first step, for every shape
its micro-batches can have; keeps them in kernel_tuning.json beside its checkpoints; uses the same ones when it is
resumed; and under torchrun every process uses the main process's. Then 10 steps + resume + 10 steps compute
exactly what 20 steps do, and all processes run the same kernels.

Timing every shape takes ~16 s per run (minutes when Triton's cache is cold), so the choices are also kept on disk per
GPU model, torch/triton version, kernel source and settings (`~/.cache/phi3-lora/`, or $PHI3_KERNEL_CACHE; "off"
disables it): a later run on the same kind of GPU times only shapes no earlier run has met. And the repository
ships the choices for Phi-3-mini and -medium's default runs on the GPUs it was measured on
(phi3/kernel_choices/, made by bench/make_kernel_choices.py for the current timed kernels; a GPU model without a
file takes one of its architecture; "off" or PHI3_SHIPPED_CHOICES=off skips them), so that a first run on a fresh
machine times nothing there either.
Before the first step every kernel binary the choices need is compiled in parallel (kernels/launch.py:
compile_ahead), so a cold Triton cache costs seconds rather than minutes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from pathlib import Path

import torch
import torch.distributed as dist

from phi3.kernels import launch, tuning
from phi3.kernels.tuning import tuning_record, use_tuning_record
from phi3.kernels.launch import AUTOTUNE_MIN_M, m_bucket
from phi3.atomic import atomic_file
from phi3.lora import LoRAConfig, add_lora, lora_modules, mark_only_lora_as_trainable
from phi3.model import MLP, Phi3ForCausalLM, token_tiles

TUNING_FILE = "kernel_tuning.json"
SHIPPED = Path(__file__).resolve().parent / "kernel_choices"  # (package data: installed with phi3)
SETTINGS = ("LORA_GEMM", "LORA_AUTOTUNE")  # environment switches that decide whether choices are timed at all


def settings() -> dict[str, str]:
    return {name: os.environ.get(name, "") for name in SETTINGS}


def to_file(record: dict) -> str:
    return json.dumps({"settings": settings(), "record": record}, indent=1) + "\n"


def from_file(data: dict) -> tuple[dict, dict]:
    """(settings, record) from a kernel_tuning.json's object; ValueError when it is not one (the record itself is
    checked by use_tuning_record)."""
    if set(data) != {"settings", "record"} or not isinstance(data["settings"], dict):
        raise ValueError("not a kernel_tuning.json (expected {\"settings\": {...}, \"record\": {...}})")
    return data["settings"], data["record"]


def token_buckets(max_tokens: int) -> list[int]:
    """A token count in each autotuning bucket (powers of two) that a micro-batch of up to max_tokens can reach;
    smaller problems run fixed configs and need no choice."""
    return [m for m in (AUTOTUNE_MIN_M << i for i in range(40)) if m <= m_bucket(max_tokens)]


def reached_buckets(token_counts) -> list[int]:
    """For the token counts micro-batches actually have, the largest count of each tuned bucket they fall in:
    one problem per bucket makes that bucket's choices (the autotuner keys on the bucket, not the count)."""
    largest = {}
    for n in token_counts:
        if m_bucket(n) >= AUTOTUNE_MIN_M:
            largest[m_bucket(n)] = max(largest.get(m_bucket(n), 0), n)
    return sorted(largest.values())


def counts_seen(model, name: str, token_counts, training: bool) -> set[int]:
    """The token counts the LoRA layer `name` is called with for micro-batches of `token_counts` tokens: an MLP's
    layers see tiles of MLP.tile_tokens when the MLP runs without autograd (eval) or under checkpointing
    (phi3/model.py); with only some layers checkpointed, the others see whole micro-batches."""
    if ".mlp." not in name:
        return set(token_counts)
    checkpointing = model.gradient_checkpointing
    tiled = not training or checkpointing
    untiled = training and (not checkpointing or model.checkpoint_layers is not None)
    seen = set()
    for n in token_counts:
        if tiled:
            seen.update(token_tiles(n, MLP.tile_tokens))  # (n itself when it fits in one tile)
        if untiled:
            seen.add(n)
    return seen


def tune_lora_layers(model: torch.nn.Module, token_counts, dtype: torch.dtype) -> None:
    """Run forward + backward of each distinct LoRA layer shape once per bucket the run reaches, training mode
    (dropout on) and eval mode, on random inputs: this makes every timing choice the run will need.
    token_counts: {"train": counts, "eval": counts} (the tokens of each micro-batch of the run), or an int, the
    largest micro-batch, for every bucket up to it in both modes. Gradients are dropped."""
    token_counts = all_counts(token_counts)
    was_training = model.training
    seen = set()
    for name, module in lora_modules(model).items():
        shape = (module.in_features, module.out_features, module.rank, tuple(module.slices), module.dropout)
        for training in (True, False):
            buckets = reached_buckets(counts_seen(model, name, token_counts["train" if training else "eval"], training))
            if (shape, training, tuple(buckets)) in seen:
                continue
            seen.add((shape, training, tuple(buckets)))
            for tokens in buckets:
                module.train(training)
                x = torch.randn(tokens, module.in_features, device=module.weight.device, dtype=dtype,
                                requires_grad=training)
                with torch.set_grad_enabled(training):
                    y = module(x)
                    if training:
                        y.backward(torch.randn_like(y))
    model.train(was_training)
    model.zero_grad(set_to_none=True)


def step_lengths(counts) -> list[int]:
    """Of a run's micro-batch token counts, one per distinct set of kernel binaries they run: Triton specializes on
    whether an int is a multiple of 16 (or 1), and the LoRA kernels run one config per tuned bucket (a fixed one
    below AUTOTUNE_MIN_M); the largest count of each such class stands for it."""
    largest = {}
    for n in counts:
        key = (m_bucket(n) if m_bucket(n) >= AUTOTUNE_MIN_M else 0, n % 16 == 0, n == 1)
        largest[key] = max(largest.get(key, 0), n)
    return sorted(largest.values())


def step_once(model, token_counts) -> None:
    """For each class of micro-batch (step_lengths) in one row: forward and backward of the whole model in training
    mode for the training counts, a forward in eval mode for the eval counts. Inside compile_ahead this notes the
    binaries of the kernels that training and evaluation run besides the LoRA layers' timed ones (RMSNorm, RoPE,
    SwiGLU; LoRA's below AUTOTUNE_MIN_M tokens). Gradients are dropped."""
    device = model.lm_head.weight.device
    was_training = model.training
    for training in (True, False):
        model.train(training)
        for tokens in step_lengths(token_counts["train" if training else "eval"]):
            ids = torch.zeros(1, tokens, dtype=torch.long, device=device)
            positions = torch.arange(tokens, device=device)[None]
            with torch.set_grad_enabled(training):
                hidden = model.hidden_states(ids, positions, None)
                if training:
                    hidden.float().sum().backward()
    model.train(was_training)
    model.zero_grad(set_to_none=True)


def all_counts(token_counts) -> dict:
    """token_counts as tune_lora_layers takes them, as {"train": counts, "eval": counts}."""
    if isinstance(token_counts, int):
        return {mode: [min(m, token_counts) for m in token_buckets(token_counts)] for mode in ("train", "eval")}
    return token_counts


def compile_run_kernels(model, token_counts, dtype: torch.dtype, device: torch.device, wait: bool = True,
                        whole_steps: bool = True):
    """Compile, in parallel, every kernel binary that tune_lora_layers (timing included) and, with whole_steps,
    training and eval steps will run (kernels/launch.py: compile_ahead); with wait=False, return while that goes
    on (the result's wait())."""
    with launch.compile_ahead(device, wait=wait) as compiling:
        tune_lora_layers(model, token_counts, dtype)
        # (no steps for --full, which has no LoRA layers: a sharded model's forward on one process would wait forever)
        if whole_steps and lora_modules(model):
            step_once(model, all_counts(token_counts))
    return compiling


def stand_in(config, lora: LoRAConfig, device: torch.device, dtype: torch.dtype, gradient_checkpointing: bool = True,
             checkpoint_layers: int | None = None) -> Phi3ForCausalLM:
    """The run's model cut to two decoder layers (every layer has the same shapes; the second, like every later one,
    takes an input that needs a gradient, so its backward runs every kernel), LoRA added and the rest frozen as
    train.py does it, weights left unset (nothing computed with them matters): what start_compiling compiles
    against."""
    with torch.device("meta"):
        model = Phi3ForCausalLM(dataclasses.replace(config, num_hidden_layers=2))
    model = model.to_empty(device=device).to(dtype)
    with torch.random.fork_rng([device] if device.type == "cuda" else []):  # LoRA's init draws: hand them back
        add_lora(model, lora)
    mark_only_lora_as_trainable(model)  # as train.py: a frozen norm's backward is another binary (no weight gradient)
    model.gradient_checkpointing, model.checkpoint_layers = gradient_checkpointing, checkpoint_layers
    return model


def start_compiling(stand_in, token_counts, dtype: torch.dtype, device: torch.device):
    """Start compiling the kernels a run needs, for the choices on disk (shipped, this machine's cache) and the
    shapes of `stand_in` (the run's model cut to two layers), and return: train.py calls this before it
    loads the checkpoint, so that compiling and loading overlap; prepare(early=...) waits for it."""
    if device.type != "cuda":
        return None
    known_choices(device, log=lambda text: None)  # (prepare reads them again, and says what is wrong with them)
    counts = token_counts() if callable(token_counts) else token_counts
    return compile_run_kernels(stand_in, counts, dtype, device, wait=False)


def known_choices(device: torch.device, log) -> tuple[Path | None, dict | None, str | None]:
    """Apply the choices on disk for this GPU: shipped ones, then this machine's cache over them.
    Returns (the cache file, its record, the GPU model the applied shipped choices were made on, or None)."""
    name, capability = torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device)
    shipped = read_shipped(name, capability, log)  # (applied: it and read_cache apply what they read)
    cache = cache_file(name, capability)
    return cache, read_cache(cache, log), shipped


def share_from_main(record: dict, rank: int, world_size: int, device: torch.device) -> dict:
    """Rank 0's record on every process (sent as JSON bytes: nothing is unpickled)."""
    if world_size == 1:
        return record
    data = torch.frombuffer(bytearray(json.dumps(record).encode()), dtype=torch.uint8).to(device) if rank == 0 else None
    size = torch.tensor([data.numel() if rank == 0 else 0], device=device)
    dist.broadcast(size, 0)
    if rank != 0:
        data = torch.empty(int(size), dtype=torch.uint8, device=device)
    dist.broadcast(data, 0)
    return json.loads(bytes(data.cpu().tolist()).decode())


def kernels_source() -> str:
    """A hash of kernels/*.py: choices made for other kernel code are not reused."""
    source = hashlib.sha256()
    for path in sorted(Path(launch.__file__).parent.glob("*.py")):
        source.update(path.name.encode() + b"\0" + path.read_bytes())
    return source.hexdigest()


def choices_source() -> str:
    """A hash of what timed choices depend on: the timed kernels' code (kernels/gemm.py, lowrank.py) and the configs
    and GEMM kinds chosen among. Shipped choices stay valid through host-side changes elsewhere in kernels/."""
    source = hashlib.sha256()
    for name in ("gemm.py", "lowrank.py"):
        source.update(name.encode() + b"\0" + (Path(launch.__file__).parent / name).read_bytes())
    space = [tuning.VERSION, tuning._KINDS,
             [(name, [tuning._config_json(c) for c in tuner.configs]) for name, tuner in launch._tuned.items()]]
    source.update(json.dumps(space).encode())
    return source.hexdigest()


def shipped_file(device_name: str) -> Path:
    return SHIPPED / (re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_") + ".json")


def same_architecture(capability: tuple[int, int]) -> Path | None:
    """A shipped choices file made on another GPU model of this compute capability (the first by name), or None."""
    for path in sorted(SHIPPED.glob("*.json")):
        try:
            if json.loads(path.read_text()).get("capability") == list(capability):
                return path
        except (OSError, UnicodeDecodeError, ValueError, AttributeError, RecursionError):
            continue  # (said when it is the file a GPU reads as its own)
    return None


def read_shipped(device_name: str, capability: tuple[int, int], log) -> str | None:
    """Apply the repository's choices for this GPU model and return the model they were made on, or None: none
    shipped, switched off, made with other kernel settings than the defaults, made for other kernels (said: they
    are to be made anew), or damaged (said). A GPU model without a file of its own takes one made on a GPU of the
    same architecture: the same configs and GEMM kinds are chosen among, and what won there is close to the best
    here (an H200 is an H100 with faster memory), which beats timing every choice at its first run."""
    if "off" in (os.environ.get("PHI3_KERNEL_CACHE", "").lower(), os.environ.get("PHI3_SHIPPED_CHOICES", "").lower()):
        return None
    if any(settings().values()):
        return None
    path = shipped_file(device_name)
    if not path.is_file():
        path = same_architecture(capability)
        if path is None:
            return None
    try:
        data = json.loads(path.read_text())
        if data["capability"] != list(capability) or shipped_file(data["device"]) != path:
            return None
        if data["kernels"] != choices_source():
            log(f"note: {path} was made for other kernels; timing them here instead (bench/make_kernel_choices.py "
                "renews it)")
            return None
        use_tuning_record(data["record"])  # validates, then applies
        return data["device"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, RecursionError) as e:
        log(f"warning: {path}: {e!r}; ignoring the shipped kernel choices (reinstall to restore the file)")
        return None


def shipped_text(device_name: str, capability: tuple[int, int], record: dict) -> str:
    """A shipped choices file (bench/make_kernel_choices.py writes it)."""
    import triton
    return json.dumps({"device": device_name, "capability": list(capability), "kernels": choices_source(),
                       "made_with": {"torch": torch.__version__, "triton": triton.__version__},
                       "record": record}, indent=1) + "\n"


def cache_file(device_name: str, capability: tuple[int, int]) -> Path | None:
    """Where choices for this GPU model, software and kernel source are kept; None when the cache is off."""
    folder = os.environ.get("PHI3_KERNEL_CACHE", "")
    if folder.lower() == "off":
        return None
    if not folder:
        folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "phi3-lora"
    import triton  # (kernels imported it already)
    key = json.dumps([device_name, list(capability), torch.__version__, triton.__version__, settings(),
                      kernels_source()])
    return Path(folder).expanduser() / f"kernel_tuning-{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"


def read_cache(path: Path | None, log) -> dict | None:
    """The cached record, or None (no cache, none yet, or a file that is not one: said, then ignored)."""
    if path is None or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if type(data) is not dict:
            raise ValueError("not a JSON object")
        settings_then, record = from_file(data)
        if settings_then != settings():
            raise ValueError("written with other kernel settings")
        use_tuning_record(record)  # validates; the caller applies it again after a resumed run's record
        return record
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        log(f"warning: {path}: {e}; ignoring the kernel cache (delete the file to silence this)")
        return None


def write_cache(path: Path | None, record: dict, log) -> None:
    """Keep the record for later runs; a cache that cannot be written is said once and costs nothing else."""
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as tmp:
            tmp.write_text(to_file(record))
    except OSError as e:
        log(f"warning: cannot keep kernel choices in {path.parent} ({e.strerror or e}); set PHI3_KERNEL_CACHE to a "
            "writable folder, or to off")


def _entries(record: dict) -> int:
    return len(record.get("kinds", {})) + len(record.get("configs", {}))


def prepare(model, token_counts, dtype: torch.dtype, device: torch.device, saved: dict | None,
            rank: int = 0, world_size: int = 1, log=lambda text: None, early=None) -> dict:
    """Make and share every kernel choice of the run before its first step; returns the record to save.
    token_counts: as tune_lora_layers takes them (a callable returning them: computed only where tuning happens).
    saved: the record of the run being resumed (validated by use_tuning_record; ValueError if it is not one).
    early: start_compiling's result, waited for here."""
    if device.type != "cuda":
        return {}  # the CPU path runs torch, not the timed kernels
    version = saved.get("version") if isinstance(saved, dict) else None
    if type(version) is int and version < tuning.VERSION:  # this project's own, from before a kernel change
        log(f"note: the resumed run's kernel choices (record version {version}) were made for older kernels; "
            "choosing anew, so the resumed steps may round differently from an uninterrupted run")
        saved = None
    if saved:
        use_tuning_record(saved)
    if rank == 0:
        cache, cached, shipped = known_choices(device, log)
        if (cached or shipped) and saved:
            use_tuning_record(saved)  # the resumed run's own choices win
        known = _entries(tuning_record())
        started = time.perf_counter()
        counts = token_counts() if callable(token_counts) else token_counts
        if early is not None:
            early.wait()
        # What `early` compiled is found compiled: its steps ran the same kernels at the same shapes (each layer is
        # alike), and tuning's pass here adds a resumed run's own choices.
        compile_run_kernels(model, counts, dtype, device, whole_steps=early is None)
        compiled = time.perf_counter() - started
        tune_lora_layers(model, counts, dtype)  # times only what neither the cache nor the resumed run had
        record = tuning_record()
        name = torch.cuda.get_device_name(device)
        if saved or shipped is None:
            source = "resumed run" if saved else "cache"
        elif shipped == name:
            source = f"cache and shipped choices for {name}"
        else:
            source = (f"cache and shipped choices made on {shipped}, a GPU of the same architecture; "
                      "bench/make_kernel_choices.py makes this GPU's own")
        log(f"kernel choices: {known} already made ({source}), {_entries(record) - known} timed now in "
            f"{time.perf_counter() - started - compiled:.1f} s after {compiled:.1f} s compiling kernels"
            + (f"; kept in {cache.parent}" if cache else ""))
        if record != cached:
            write_cache(cache, record, log)
    record = share_from_main(tuning_record() if rank == 0 else {}, rank, world_size, device)
    use_tuning_record(record)
    return record
