"""Phi-3 tokenizer: `tokenizers`-backed encode/decode, chat rendering -> (ids, loss mask), stop ids.

    tok = load_tokenizer("~/Phi-3-mini-4k-instruct")      # folder with tokenizer.json
    ids, mask = tok.render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}])

No jinja at runtime: the checkpoint's chat_template is recognised as one of the four Phi-3 templates below and
rendered by plain Python, so `render` gives the same ids as transformers' `apply_chat_template(tokenize=True)`
run on the checkpoint's tokenizer.json (see the note on transformers 5 in `load_tokenizer`).

  "phi3"        July-2024 mini 4k/128k: <|system|>/<|user|>/<|assistant|> + "\n" + content + "<|end|>\n" per
                message, then "<|assistant|>\n" if add_generation_prompt else eos (<|endoftext|>).
  "phi3.5"      Phi-3.5-mini: as "phi3" but a system message with empty content renders nothing.
  "phi3-bos"    April/May-2024 mini: "<s>", then user -> "<|user|>\n" + c + "<|end|>\n<|assistant|>\n",
                assistant -> c + "<|end|>\n"; system messages are dropped; add_generation_prompt has no effect
                (the assistant header already follows every user turn).
  "phi3-medium" medium 4k/128k: as "phi3-bos" without the leading "<s>".

Loss mask (True = token is trained): the assistant content and its "<|end|>". Never the role headers, the
"<|endoftext|>" closing the July template, nor BOS. The "\n" after "<|end|>" is NOT a separate token with the
Phi-3 tokenizer (the chat special tokens have rstrip=true, so "<|end|>\n" is the single id 32007); with a
tokenizer.json whose special tokens lack rstrip, the "\n" tokens exist and are not trained. For the same reason
whitespace at the start of an assistant message is swallowed by the "<|assistant|>" token and is not trained.
The mask is computed from character spans on one encoding of the whole rendered string, so ids always equal
the whole-string encoding.
"""
from __future__ import annotations

import os
import re
from bisect import bisect_right

from tokenizers import Tokenizer

from phi3.config import is_int, open_regular, read_json_object, show

ROLES = ("system", "user", "assistant")
FIX = "use the checkpoint's own tokenizer files (download them again)"
MAX_TOKENIZER_BYTES = 256 * 2**20  # tokenizer.json: Phi-3's is 1.8 MiB, the largest common ones about 35 MiB
MAX_TEMPLATE_CHARS = 8192  # the Phi-3 templates are under 1 KB; _fingerprint can take quadratic time on long text


class TokenizerError(ValueError):
    """A checkpoint's tokenizer files are missing or not understood (message: file, what, what to do)."""


# --- chat templates -----------------------------------------------------------------------------------------

_JULY = ("{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
         "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
         "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
         "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}"
         "{% endif %}")
_PHI35 = _JULY.replace("message['role'] == 'system' %}", "message['role'] == 'system' and message['content'] %}")
_MEDIUM = ("{% for message in messages %}{% if (message['role'] == 'user') %}{{'<|user|>' + '\n' + message['content'] "
           "+ '<|end|>' + '\n' + '<|assistant|>' + '\n'}}{% elif (message['role'] == 'assistant') %}"
           "{{message['content'] + '<|end|>' + '\n'}}{% endif %}{% endfor %}")
_BOS = "{{ bos_token }}" + _MEDIUM


def _fingerprint(template: str) -> str:
    """Template source with whitespace, jinja trim markers and quote style normalised outside string literals."""
    parts = re.split(r"""('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")""", template.replace("\r\n", "\n").strip())
    out = []
    for i, p in enumerate(parts):
        if i % 2:  # a string literal: keep its text, unify quotes; jinja '\n' escapes == real newlines
            out.append("'" + p[1:-1].replace("\\n", "\n") + "'")
        else:
            out.append(re.sub(r"\s+", "", p).replace("{%-", "{%").replace("-%}", "%}")
                       .replace("{{-", "{{").replace("-}}", "}}"))
    return "".join(out)


KNOWN_TEMPLATES = {_fingerprint(_JULY): "phi3", _fingerprint(_PHI35): "phi3.5",
                   _fingerprint(_BOS): "phi3-bos", _fingerprint(_MEDIUM): "phi3-medium"}
CHAT_FORMATS = ("phi3", "phi3.5", "phi3-bos", "phi3-medium")


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
        self.supports_system = chat_format in ("phi3", "phi3.5")
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
        self.end_id = tokenizer.token_to_id("<|end|>")
        if self.end_id is None:
            raise TokenizerError(f"{name}: tokenizer.json has no <|end|> token; this is not a Phi-3 tokenizer.")
        self.add_bos = bool(config.get("add_bos_token", False))
        self.bos, self.eos = tokenizer.id_to_token(self.bos_id), tokenizer.id_to_token(self.eos_id)
        stop = generation_config.get("eos_token_id")
        stop = [stop] if is_int(stop) else stop
        if stop is not None and not (isinstance(stop, list) and all(is_int(i) and 0 <= i < self.vocab_size
                                                                    for i in stop)):
            raise TokenizerError(f"{generation_name}: 'eos_token_id' must be a token id or a list of them (ids of "
                                 f"{name}, below {self.vocab_size}), got {show(generation_config['eos_token_id'])}; "
                                 f"{FIX}")
        self.stop_ids: tuple[int, ...] = tuple(dict.fromkeys(stop or [self.eos_id, self.end_id]))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no BOS. Special-token strings in the text ("<|end|>") become special ids."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special: bool = True) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def _render_string(self, messages: list[dict], add_generation_prompt: bool) -> tuple[str, list[tuple[int, int]]]:
        """The template's output string and the character spans that are trained."""
        text, spans = "", []
        legacy = self.chat_format in ("phi3-bos", "phi3-medium")
        if self.chat_format == "phi3-bos":
            text += self.bos
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise ValueError(f"messages[{i}] is a {type(m).__name__}; expected a dict with role and content")
            role, content = m.get("role"), m.get("content")
            if role not in ROLES:
                raise ValueError(f"messages[{i}] has role {role!r}; expected one of {ROLES}")
            if not isinstance(content, str):
                raise ValueError(f"messages[{i}].content is a {type(content).__name__}; expected a string")
            if legacy:
                if role == "user":
                    text += "<|user|>\n" + content + "<|end|>\n<|assistant|>\n"
                elif role == "assistant":
                    spans.append((len(text), len(text) + len(content) + len("<|end|>")))
                    text += content + "<|end|>\n"
                # system: dropped by these templates
            elif role == "system" and self.chat_format == "phi3.5" and not content:
                continue
            else:
                text += f"<|{role}|>\n"
                if role == "assistant":
                    spans.append((len(text), len(text) + len(content) + len("<|end|>")))
                text += content + "<|end|>\n"
        if not legacy:
            text += "<|assistant|>\n" if add_generation_prompt else self.eos
        return text, spans

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
        return self._encode_masked(*self._render_string(messages, add_generation_prompt))

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
    special token ("<|user|>\\nHello": 15043 "▁Hello" here, 10994 "Hello" there).
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
    gen = _read_json(gp) if os.path.exists(gp) else {}
    if chat_format is None:
        template, where = _find_template(folder, config)
        if template is None:
            chat_format = "phi3"
        else:
            chat_format = KNOWN_TEMPLATES.get(_fingerprint(template)) if len(template) <= MAX_TEMPLATE_CHARS else None
            if chat_format is None:
                raise TokenizerError(
                    f"{where}: chat_template is not one of the supported Phi-3 templates (July-2024 mini, "
                    f"Phi-3.5-mini, April/May-2024 mini with <s>, medium); use a Phi-3 checkpoint's template, or "
                    f"pass chat_format= one of {CHAT_FORMATS} to load_tokenizer to render with that one")
    return Phi3Tokenizer(tok, config, gen, chat_format=chat_format, name=tj, config_name=cp, generation_name=gp)
