"""Chat with a Phi-3 model, optionally with a LoRA adapter.

    python sample.py                                    # the embedded tiny model + the adapter in ./out if present
    python sample.py --model ~/Phi-3-mini-4k-instruct --prompt "Why is the sky blue?"
    python sample.py --adapter runs/a                   # adapter on its base model (merged for speed)
    echo "Define 'cat'." | python sample.py             # prompt from stdin

Only the assistant's reply goes to stdout, streamed token by token; statistics go to stderr. Without
--prompt on a terminal it is a multi-turn chat (empty line or Ctrl-D to quit). Prompt + reply stay within the
model's context (max_position_embeddings): a reply stops there, and the chat drops its oldest turns. Every
problem with a flag, a file or the prompt is one line `error: ...` on stderr and exit code 2; Ctrl-C exits 130.
"""

from __future__ import annotations

import signal

if __name__ == "__main__":  # Ctrl-C while the imports below load (seconds) ends the process quietly, as later
    signal.signal(signal.SIGINT, signal.SIG_DFL)

import argparse
import codecs
import math
import os
import sys
import time
from pathlib import Path

import torch

from phi3 import CheckpointError, ConfigError, load_model, load_tokenizer
from phi3.checkpoint import EMBEDDED_MODEL, check_tokenizer_fits, parse_dtype
from phi3.distributed import device_problems
from phi3.lora import adapter_base_model, load_adapter, merge_lora
from phi3.quantized import is_4bit
from phi3.generate import generate
from phi3.tokenizer import TokenizerError

if __name__ == "__main__":  # imports done: Ctrl-C is a KeyboardInterrupt again (a quiet exit 130, see the end)
    signal.signal(signal.SIGINT, signal.default_int_handler)

DEFAULT_ADAPTER = Path("out")
# What a model, tokenizer or adapter folder we cannot use raises (messages name the file), and what a prompt,
# the logits or a GPU too small raises; each is reported as one line.
ERRORS = (CheckpointError, ConfigError, TokenizerError, OSError, ValueError, torch.OutOfMemoryError)


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line `error: ...` and exit code 2 (argparse's own adds a usage line)."""

    def error(self, message):
        self.exit(2, f"error: {message}; see python {self.prog} --help\n")


def flag_type(kind, ok, rule: str):
    """An argparse type: text -> kind(text) where ok(value), else an error '<text> is not <rule>'."""
    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:  # also int() of more than 4300 digits
            value = None
        if value is None or not ok(value):  # NaN fails every comparison in ok
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not {rule}")
        return value
    return convert


count = flag_type(int, lambda v: v >= 0, "a whole number >= 0")
temperature = flag_type(float, lambda v: 0 <= v < math.inf, "a finite number >= 0 (0 = greedy)")
probability = flag_type(float, lambda v: 0 < v <= 1, "a number in (0, 1] (1 = keep every token)")
seed = flag_type(int, lambda v: 0 <= v < 2**64, "a whole number in [0, 2**64)")


def check_device(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--device and --dtype must work on this machine: refused now, not as a torch traceback after loading."""
    problems = device_problems(args.device)
    if problems:
        parser.error(problems[0])
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    # bf16 (the GPU default) needs Ampere or newer; the CPU does bf16 and fp16 (slowly)
    if device.type == "cuda" and args.dtype in (None, "bf16") and torch.cuda.get_device_capability(device) < (8, 0):
        parser.error(f"--device {args.device}: {torch.cuda.get_device_name(device)} cannot compute in bf16 (the GPU "
                     "default; it needs compute capability 8.0+); pass --dtype fp16 or fp32")


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(prog="sample.py", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None,
                   help="checkpoint folder in Hugging Face layout (default: the adapter's base, else models/tiny-phi3)")
    p.add_argument("--adapter", type=Path, default=None,
                   help="LoRA adapter folder (PEFT layout); default ./out when it holds one, 'none' to disable")
    p.add_argument("--prompt", default=None, help="one user message; without it: interactive chat (or stdin)")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--max-new-tokens", type=count, default=512,
                   help="reply length limit (0: no reply, only the prompt's token count)")
    p.add_argument("--temperature", type=temperature, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=count, default=None, help="sample from the k likeliest tokens (0 = all)")
    p.add_argument("--top-p", type=probability, default=None, help="nucleus sampling mass, in (0, 1]")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda if there is a GPU, else cpu), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--quantize", default=None, choices=["nf4"],
                   help="nf4: hold the base's layer weights in 4 bits (a folder saved in 4-bit loads as 4-bit anyway)")
    args = p.parse_args(argv)
    check_device(p, args)
    return args


def resolve_adapter(arg: Path | None) -> Path | None:
    if arg is not None:
        return None if str(arg) == "none" else arg
    return DEFAULT_ADAPTER if (DEFAULT_ADAPTER / "adapter_config.json").is_file() else None


def load_for_chat(model_dir: Path | None, adapter: Path | None, device: str, dtype: str | None = None,
                  quantize: str | None = None):
    """(model, tokenizer) for generation: the adapter merged into the weights (no training follows; on a 4-bit
    base it stays beside them), and the base taken from --model, else the adapter's base_model_name_or_path, else
    the embedded tiny model."""
    if model_dir is None and adapter is not None:
        model_dir = adapter_base_model(adapter)
        if model_dir is None:  # guessing a base for someone else's adapter would only fail later, less clearly
            raise CheckpointError(f"{adapter / 'adapter_config.json'}: names no base model "
                                  "(base_model_name_or_path); pass --model with the checkpoint it was trained on")
    model_dir = model_dir or EMBEDDED_MODEL
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, dtype=parse_dtype(dtype), device=device, quantize=quantize)
    check_tokenizer_fits(tokenizer, model.config, model_dir)
    if adapter is not None:
        load_adapter(model, adapter)
        if not is_4bit(model):
            merge_lora(model)  # fold B A into W once: decoding runs at base speed
    print(f"model {model_dir}" + (f" + adapter {adapter}" if adapter else ""), file=sys.stderr)
    return model, tokenizer


def check_text(text: str, where: str) -> str:
    """Text the tokenizer can take, else ValueError. Bytes that are not UTF-8 reach Python from the command line
    or a terminal as lone surrogates ('\\udcff'), which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{where}: character {e.start} is {text[e.start]!r}, not text (bytes that are not UTF-8); "
                         "pass UTF-8 text") from None
    return text


def read_stdin(tokenizer, context: int) -> str:
    """The prompt piped on stdin: UTF-8 (a BOM is dropped), not empty, and refused once it holds more bytes
    than `context` tokens can spell (each token is at most 4 bytes per character of its vocabulary entry), so a
    huge pipe is not read whole and tokenized only to be refused."""
    if sys.stdin is None:  # started with stdin closed: `python sample.py <&-`
        raise ValueError("no --prompt, and stdin is closed; pass --prompt, or pipe the message on stdin")
    limit = context * 4 * max(map(len, tokenizer.tok.get_vocab(with_added_tokens=True)))
    try:
        data = sys.stdin.buffer.read(limit + 1)
    except OSError as e:
        raise ValueError(f"stdin: cannot read it ({e.strerror or e}); pipe a text file, or pass --prompt") from None
    if len(data) > limit:
        raise ValueError(f"stdin: more than {limit} bytes, too long for the model's {context}-token context; "
                         "pipe a shorter prompt")
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0  # as Windows editors write it
    try:
        text = data[bom:].decode("utf-8").strip()
    except UnicodeDecodeError as e:
        at = bom + e.start
        raise ValueError(f"stdin: byte {at} (0x{data[at]:02x}) is not UTF-8; pipe UTF-8 text "
                         "(e.g. through iconv -t UTF-8)") from None
    if not text:
        raise ValueError("no prompt on stdin (it is empty); pipe a message, or pass --prompt")
    return text


def fit_history(tokenizer, messages: list[dict], context: int, room: int) -> tuple[list[int], int]:
    """The chat's prompt ids, after dropping its oldest turns (user message + reply; never the system message or
    the newest message) until `room` tokens are left for the reply. Also returns how many turns were dropped."""
    first = 1 if messages[0]["role"] == "system" else 0
    dropped = 0
    while True:
        prompt, _ = tokenizer.render(messages, add_generation_prompt=True)
        if len(prompt) + room <= context or len(messages) - first <= 1:
            return prompt, dropped
        del messages[first:first + 2]
        dropped += 1


def too_long(prompt: list[int], context: int, what: str) -> str:
    return (f"{what} is {len(prompt)} tokens with the chat template and the model's context is {context} "
            "(max_position_embeddings): no room for a reply; shorten it")


def reply(model, tokenizer, prompt: list[int], args, generator) -> list[int]:
    """Stream one assistant reply to stdout; return its token ids (without the stop id)."""
    out_ids: list[int] = []
    printed = ""
    stopped = False
    start = time.perf_counter()
    for token in generate(model, prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                          stop_ids=tokenizer.stop_ids, generator=generator):
        if token in tokenizer.stop_ids:
            stopped = True
            break
        out_ids.append(token)
        text = tokenizer.decode(out_ids)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text
    seconds = time.perf_counter() - start
    sys.stdout.write(tokenizer.decode(out_ids)[len(printed):] + "\n")
    sys.stdout.flush()
    print(f"[prompt {len(prompt)} tokens, reply {len(out_ids)} tokens, {len(out_ids) / max(seconds, 1e-9):.1f} tokens/s]",
          file=sys.stderr)
    context = model.config.max_position_embeddings
    if not stopped and len(out_ids) < args.max_new_tokens and len(prompt) + len(out_ids) == context:
        print(f"[reply cut at the model's {context}-token context, before --max-new-tokens {args.max_new_tokens}; "
              "a shorter prompt leaves more room]", file=sys.stderr)
    return out_ids


def chat(model, tokenizer, messages: list[dict], args, generator) -> int:
    """Multi-turn chat on a terminal. A line that cannot be used is reported and the chat goes on."""
    context = model.config.max_position_embeddings
    # the reply's room: --max-new-tokens, but at most half the context, so that long replies keep some history
    room = min(max(args.max_new_tokens, 1), context // 2)
    print("chat: empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        except UnicodeDecodeError:  # a terminal in a UTF-8 locale passed bytes that are not UTF-8
            print("error: that line is not UTF-8 text; type it again", file=sys.stderr)
            continue
        text = line.strip()
        if not text:
            return 0
        try:
            check_text(text, "that line")
        except ValueError as e:  # bytes that are not UTF-8, in a locale that lets them through as surrogates
            print(f"error: {e}", file=sys.stderr)
            continue
        newest = {"role": "user", "content": text}
        system = [m for m in messages[:1] if m["role"] == "system"]
        alone, _ = tokenizer.render(system + [newest], add_generation_prompt=True)
        if len(alone) >= context:  # checked before any history is dropped for it
            print(f"error: {too_long(alone, context, 'that message')}", file=sys.stderr)
            continue
        messages.append(newest)
        prompt, dropped = fit_history(tokenizer, messages, context, room)
        if dropped:
            print(f"[the chat outgrew the model's {context}-token context: dropped its {dropped} oldest turn(s)]",
                  file=sys.stderr)
        ids = reply(model, tokenizer, prompt, args, generator)
        messages.append({"role": "assistant", "content": tokenizer.decode(ids)})


def one_line(e: Exception) -> str:
    """An error's message on one line; an OSError as 'PATH: reason' (its str is '[Errno 13] ...: PATH')."""
    if isinstance(e, torch.OutOfMemoryError):
        return "out of GPU memory; use a smaller model, --dtype bf16, a smaller --max-new-tokens, or --device cpu"
    if isinstance(e, OSError) and e.filename is not None:
        return f"{e.filename}: {e.strerror}; check the path and its permissions"
    return " ".join(str(e).splitlines())


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    try:
        for text, flag in ((args.prompt, "--prompt"), (args.system, "--system")):
            if text is not None:
                check_text(text, flag)
        if args.prompt is not None and not args.prompt.strip():
            raise ValueError("--prompt is empty; pass the message to answer")
        model, tokenizer = load_for_chat(args.model, resolve_adapter(args.adapter), args.device, args.dtype,
                                         args.quantize)
        context = model.config.max_position_embeddings
        messages = [{"role": "system", "content": args.system}] if args.system else []
        if args.prompt is None and sys.stdin is not None and sys.stdin.isatty():
            return chat(model, tokenizer, messages, args, generator)
        text = args.prompt if args.prompt is not None else check_text(read_stdin(tokenizer, context), "stdin")
        prompt, _ = tokenizer.render(messages + [{"role": "user", "content": text}], add_generation_prompt=True)
        if len(prompt) >= context:
            raise ValueError(too_long(prompt, context, "the prompt" + (" (with --system)" if args.system else "")))
        reply(model, tokenizer, prompt, args, generator)
        return 0
    except BrokenPipeError:  # not an error of the input: __main__ ends quietly
        raise
    except ERRORS as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    for name in ("stdout", "stderr"):  # started with it closed (`2>&-`): print(file=None) would write to stdout
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "w"))
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C while a reply streams: stop quietly
        print(file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # the reader of stdout left (`| head -1`): stop quietly, exit 141 as SIGPIPE would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit would fail again
        sys.exit(141)
