"""Phi-3 / Phi-4 tokenizer: `tokenizers`-backed encode/decode, chat rendering -> (ids, loss mask), stop ids.

    tok = load_tokenizer("~/Phi-3-mini-4k-instruct")      # folder with tokenizer.json
    ids, mask = tok.render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}])

No jinja at runtime: the checkpoint's chat_template is recognised as one of the Phi-3 / Phi-4 templates of
phi3/chat_template.py, which renders it in plain Python, so `render` gives the same ids as transformers'
`apply_chat_template(tokenize=True)` run on the checkpoint's tokenizer.json (see the note on transformers 5 in
`load_tokenizer`).

Loss mask (True = token is trained): the assistant content and the token that ends its turn ("<|end|>", or
"<|im_end|>" for "phi4"). Never the role headers, the eos closing the July and phi4-mini templates, nor BOS. The
"\n" after "<|end|>" is NOT a separate token with the Phi-3 tokenizer (the chat special tokens have rstrip=true,
so "<|end|>\n" is the single id 32007); with a tokenizer.json whose special tokens lack rstrip, the "\n" tokens
exist and are not trained. For the same reason whitespace at the start of an assistant message is swallowed by the
"<|assistant|>" token and is not trained. Phi-4-mini's <|assistant|>, <|end|>, <|user|> and <|system|> have rstrip
as well, and all of Phi-4's special tokens have lstrip and rstrip: "<|im_end|>" swallows the whitespace on both
sides, so an assistant message's trailing whitespace is no token of its own (it is inside the trained "<|im_end|>").
The mask is computed from character spans on one encoding of the whole rendered string, so ids always equal
the whole-string encoding.
"""
from __future__ import annotations

import os
from bisect import bisect_right

from tokenizers import Tokenizer

from phi3.chat_template import CHAT_FORMATS, END_OF_TURN, KNOWN_TEMPLATES, fingerprint, render_chat
from phi3.config import is_int, open_regular, read_json_object, show

FIX = "use the checkpoint's own tokenizer files (download them again)"
GENERATION_FIX = "use the checkpoint's own generation_config.json (download it again)"
MAX_TOKENIZER_BYTES = 256 * 2**20  # tokenizer.json: Phi-3's is 1.8 MiB, the largest common ones about 35 MiB
MAX_TEMPLATE_CHARS = 8192  # the Phi templates are under 1 KB; fingerprint() can take quadratic time on long text


class TokenizerError(ValueError):
    """A checkpoint's tokenizer files are missing or not understood (message: file, what, what to do)."""


def _read_json(path: str) -> dict:
    return read_json_object(path, TokenizerError, FIX)


def _read_template_file(path: str) -> str:
    """chat_template.jinja, cut after what could still be a Phi-3 template (a longer text cannot match one; bytes
    that are not UTF-8 cannot either, so they become U+FFFD instead of an error)."""
    try:
        with open_regular(path) as f:
            return f.read(4 * MAX_TEMPLATE_CHARS + 1).decode("utf-8", errors="replace")
    except OSError as e:
        raise TokenizerError(f"{path}: cannot be read ({e.strerror or e}); {FIX}") from None


def _template(value, path: str) -> str | None:
    """A chat_template value: a string, or transformers' list of named templates (the "default" one is used)."""
    if isinstance(value, list) and all(isinstance(x, dict) and isinstance(x.get("name"), str) for x in value):
        value = next((x.get("template") for x in value if x["name"] == "default"), None)
    if value is not None and not isinstance(value, str):
        raise TokenizerError(f"{path}: 'chat_template' must be a template string or a list of "
                             f"{{\"name\", \"template\"}} objects, got {show(value)}; {FIX}")
    return value


def _find_template(folder: str, config: dict) -> tuple[str | None, str]:
    """(template source, file it came from). Newer HF checkpoints keep it beside tokenizer_config.json."""
    p = os.path.join(folder, "chat_template.jinja")
    if os.path.exists(p):
        return _read_template_file(p), p
    for name, d in (("chat_template.json", None), ("tokenizer_config.json", config)):
        p = os.path.join(folder, name)
        if d is None:
            if not os.path.exists(p):
                continue
            d = _read_json(p)
        t = _template(d.get("chat_template"), p)
        if t is not None:
            return t, p
    return None, os.path.join(folder, "tokenizer_config.json")


def _check_config(config: dict, path: str) -> None:
    """The tokenizer_config.json values Phi3Tokenizer reads have the types it expects."""
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        v = config.get(key)
        if not (v is None or isinstance(v, str) or (isinstance(v, dict) and isinstance(v.get("content"), str))):
            raise TokenizerError(f"{path}: '{key}' must be a token string or an object with a string 'content', got "
                                 f"{show(v)}; {FIX}")
    if config.get("add_bos_token") is not None and not isinstance(config["add_bos_token"], bool):
        raise TokenizerError(f"{path}: 'add_bos_token' must be true or false, got {show(config['add_bos_token'])}; "
                             f"{FIX}")


def _token_str(v) -> str | None:
    return v.get("content") if isinstance(v, dict) else v


class Phi3Tokenizer:
    def __init__(self, tokenizer: Tokenizer, config: dict | None = None, generation_config: dict | None = None,
                 chat_format: str = "phi3", name: str = "tokenizer", config_name: str = "tokenizer_config.json",
                 generation_name: str = "generation_config.json"):
        """`name`, `config_name` and `generation_name` are the files the three arguments came from, for messages."""
        config, generation_config = config or {}, generation_config or {}
        if chat_format not in CHAT_FORMATS:
            raise ValueError(f"unknown chat_format {chat_format!r}; expected one of {CHAT_FORMATS}")
        _check_config(config, config_name)
        self.tok = tokenizer
        self.tok.no_truncation()
        self.tok.no_padding()
        self.chat_format = chat_format
        self.supports_system = chat_format in ("phi3", "phi3.5", "phi4-mini", "phi4")
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

        def tid(key: str, default: str | None) -> int | None:
            s = _token_str(config.get(key)) or default
            i = tokenizer.token_to_id(s) if s is not None else None
            if s is not None and i is None and default is not None:
                raise TokenizerError(f"{config_name}: {key} {show(s)} is not a token of {name}; {FIX}")
            return i

        self.bos_id = tid("bos_token", "<s>")
        self.eos_id = tid("eos_token", "<|endoftext|>")
        self.pad_id = tid("pad_token", None)
        self.pad_id = self.eos_id if self.pad_id is None else self.pad_id
        self.unk_id = tid("unk_token", None)
        # the token that ends a turn comes from the chat format, not from eos_token: Phi-4's eos was <|endoftext|>
        # until January 2025 and is <|im_end|> since, while its turns always end with <|im_end|>
        self.end_token = END_OF_TURN.get(chat_format, "<|end|>")
        self.end_id = tokenizer.token_to_id(self.end_token)
        if self.end_id is None:
            raise TokenizerError(f"{name}: has no {self.end_token} token, which chat format {chat_format!r} ends "
                                 f"turns with; {FIX}")
        self.add_bos = bool(config.get("add_bos_token", False))
        self.bos, self.eos = tokenizer.id_to_token(self.bos_id), tokenizer.id_to_token(self.eos_id)
        stop = generation_config.get("eos_token_id")
        stop = [stop] if is_int(stop) else stop
        if stop is not None and not (isinstance(stop, list) and stop and all(is_int(i) and 0 <= i < self.vocab_size
                                                                             for i in stop)):
            raise TokenizerError(f"{generation_name}: 'eos_token_id' must be a token id or a non-empty list of them "
                                 f"(ids of {name}, below {self.vocab_size}), got "
                                 f"{show(generation_config['eos_token_id'])}; {GENERATION_FIX}")
        self.stop_ids: tuple[int, ...] = tuple(dict.fromkeys(stop or [self.eos_id, self.end_id]))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no BOS. Special-token strings in the text ("<|end|>") become special ids."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special: bool = True) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def _encode_masked(self, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[bool]]:
        enc = self.tok.encode(text, add_special_tokens=False)
        starts = [s for s, _ in spans]
        mask = []
        for start, _ in enc.offsets:  # a token is trained iff it starts inside a trained span
            j = bisect_right(starts, start) - 1
            mask.append(j >= 0 and start < spans[j][1])
        return enc.ids, mask

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
        """(ids, mask) of a chat; ids == apply_chat_template(messages, tokenize=True, add_generation_prompt=...)."""
        return self._encode_masked(*render_chat(self.chat_format, messages, add_generation_prompt, self.bos,
                                                self.eos))

    def render_text(self, text: str) -> tuple[list[int], list[bool]]:
        """Plain language-modelling example: [BOS if add_bos] + text + eos; every token but BOS is trained."""
        ids = ([self.bos_id] if self.add_bos else []) + self.encode(text) + [self.eos_id]
        return ids, [not (self.add_bos and i == 0) for i in range(len(ids))]

    def render_completion(self, prompt: str, completion: str) -> tuple[list[int], list[bool]]:
        """A prompt/completion pair as a one-turn user/assistant chat (completion + <|end|> trained)."""
        return self.render([{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}])

    def __repr__(self) -> str:
        return (f"Phi3Tokenizer(vocab_size={self.vocab_size}, chat_format={self.chat_format!r}, "
                f"add_bos={self.add_bos}, stop_ids={self.stop_ids})")


def load_tokenizer(path, chat_format: str | None = None) -> Phi3Tokenizer:
    """Load tokenizer.json (+ tokenizer_config.json, generation_config.json, chat_template.{jinja,json}) from a
    checkpoint folder. The chat template is recognised as one of CHAT_FORMATS; a folder without any template
    gets "phi3" (July-2024); an unrecognised template raises TokenizerError unless `chat_format` forces one.

    Note: ids follow the pipeline stored in tokenizer.json (as transformers 4.x, vLLM and
    `PreTrainedTokenizerFast(tokenizer_file=...)` do). transformers 5's AutoTokenizer rebuilds Llama-class
    tokenizers with a Metaspace(prepend_scheme="first") pre-tokenizer and then differs on text right after a
    special token ("<|user|>\\nHello": 15043 "▁Hello" here, 10994 "Hello" there). Likewise it rebuilds Phi-4's
    (tokenizer_class GPT2Tokenizer) with GPT-2's split regex instead of the o200k / cl100k one in tokenizer.json,
    and differs on digits and contractions ("1234567": 7633 19354 22 here, 7633 2548 5462 there).
    """
    folder = os.path.expanduser(os.fspath(path))
    if not os.path.isdir(folder):
        raise TokenizerError(f"{folder}: checkpoint folder not found; pass a folder in Hugging Face layout "
                             "(config.json, model.safetensors, tokenizer.json)")
    tj = os.path.join(folder, "tokenizer.json")
    if not os.path.exists(tj):
        raise TokenizerError(f"{tj}: not found. Point at a checkpoint folder that holds tokenizer.json "
                             "(the HF Phi-3 repos ship one).")
    try:  # read here, not by path in tokenizers: a FIFO must not block, and the size is bounded
        with open_regular(tj) as f:
            raw = f.read(MAX_TOKENIZER_BYTES + 1)
        text = raw.decode("utf-8")
    except OSError as e:
        raise TokenizerError(f"{tj}: cannot be read ({e.strerror or e}); {FIX}") from None
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{tj}: cannot be parsed by tokenizers (not UTF-8 text: byte {e.start}); {FIX}") from None
    if len(raw) > MAX_TOKENIZER_BYTES:
        raise TokenizerError(f"{tj}: more than {MAX_TOKENIZER_BYTES} bytes, too large for a tokenizer.json; {FIX}")
    try:
        tok = Tokenizer.from_str(text)
    except Exception as e:  # tokenizers raises a plain Exception on bad files
        raise TokenizerError(f"{tj}: cannot be parsed by tokenizers ({show(str(e), 200)}); {FIX}") from None
    except BaseException as e:  # a Rust panic arrives as pyo3's PanicException, a BaseException
        if type(e).__name__ != "PanicException":
            raise
        raise TokenizerError(f"{tj}: tokenizers failed on this file ({show(str(e), 200)}); {FIX}") from None
    cp, gp = os.path.join(folder, "tokenizer_config.json"), os.path.join(folder, "generation_config.json")
    config = _read_json(cp) if os.path.exists(cp) else {}
    gen = read_json_object(gp, TokenizerError, GENERATION_FIX) if os.path.exists(gp) else {}
    if chat_format is None:
        template, where = _find_template(folder, config)
        if template is None:
            chat_format = "phi3"
        else:
            chat_format = KNOWN_TEMPLATES.get(fingerprint(template)) if len(template) <= MAX_TEMPLATE_CHARS else None
            if chat_format is None:
                raise TokenizerError(
                    f"{where}: chat_template is not one of the supported Phi templates (Phi-3-mini July-2024, "
                    f"Phi-3.5-mini, Phi-3-mini April/May-2024 with <s>, Phi-3-medium, Phi-4-mini-instruct, Phi-4 "
                    f"since January 2025); use the checkpoint's own template, or pass chat_format= one of "
                    f"{CHAT_FORMATS} to load_tokenizer to render with that one")
    return Phi3Tokenizer(tok, config, gen, chat_format=chat_format, name=tj, config_name=cp, generation_name=gp)
