"""Phi chat templates: recognised by fingerprint, rendered in plain Python as (text, trained character spans).

A checkpoint's chat_template (jinja) is matched against the templates below with whitespace, trim markers and
quote style normalised (`fingerprint`); `render_chat` then writes what that template writes, and phi3/tokenizer.py
encodes the text and turns the spans into the loss mask.

  "phi3"        July-2024 mini 4k/128k: <|system|>/<|user|>/<|assistant|> + "\n" + content + "<|end|>\n" per
                message, then "<|assistant|>\n" if add_generation_prompt else eos (<|endoftext|>).
  "phi3.5"      Phi-3.5-mini: as "phi3" but a system message with empty content renders nothing.
  "phi3-bos"    April/May-2024 mini: "<s>", then user -> "<|user|>\n" + c + "<|end|>\n<|assistant|>\n",
                assistant -> c + "<|end|>\n"; system messages are dropped; add_generation_prompt has no effect
                (the assistant header already follows every user turn).
  "phi3-medium" medium 4k/128k: as "phi3-bos" without the leading "<s>".
  "phi4-mini"   Phi-4-mini-instruct: "<|" + role + "|>" + content + "<|end|>" per message, no newlines (a system
                message's "tools" string goes in "<|tool|>...<|/tool|>" before its "<|end|>"), then "<|assistant|>"
                if add_generation_prompt else eos (<|endoftext|>).
  "phi4"        Phi-4 (since the January-2025 tokenizer fix): "<|im_start|>" + role + "<|im_sep|>" + content +
                "<|im_end|>" per message, then "<|im_start|>assistant<|im_sep|>" if add_generation_prompt; no eos.

A trained span is an assistant message's content and the token that ends its turn (END_OF_TURN).
"""
from __future__ import annotations

import re

ROLES = ("system", "user", "assistant")

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
_PHI4_MINI = ("{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and "
              "message['tools'] is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + "
              "message['tools'] + '<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + "
              "message['content'] + '<|end|>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
              "{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}")
_PHI4 = ("{% for message in messages %}{% if (message['role'] == 'system') %}{{'<|im_start|>system<|im_sep|>' + "
         "message['content'] + '<|im_end|>'}}{% elif (message['role'] == 'user') %}{{'<|im_start|>user<|im_sep|>' + "
         "message['content'] + '<|im_end|>'}}{% elif (message['role'] == 'assistant') %}"
         "{{'<|im_start|>assistant<|im_sep|>' + message['content'] + '<|im_end|>'}}{% endif %}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}")


def fingerprint(template: str) -> str:
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


KNOWN_TEMPLATES = {fingerprint(_JULY): "phi3", fingerprint(_PHI35): "phi3.5",
                   fingerprint(_BOS): "phi3-bos", fingerprint(_MEDIUM): "phi3-medium",
                   fingerprint(_PHI4_MINI): "phi4-mini", fingerprint(_PHI4): "phi4"}
CHAT_FORMATS = ("phi3", "phi3.5", "phi3-bos", "phi3-medium", "phi4-mini", "phi4")
END_OF_TURN = {"phi4": "<|im_end|>"}  # the token that closes a message; "<|end|>" in every other format


def render_chat(chat_format: str, messages: list[dict], add_generation_prompt: bool, bos: str, eos: str
                ) -> tuple[str, list[tuple[int, int]]]:
    """The template's output string and the character spans that are trained."""
    if chat_format == "phi4-mini":
        return _render_phi4_mini(messages, add_generation_prompt, eos)
    if chat_format == "phi4":
        return _render_phi4(messages, add_generation_prompt)
    return _render_phi3(chat_format, messages, add_generation_prompt, bos, eos)


def _render_phi3(chat_format: str, messages: list[dict], add_generation_prompt: bool, bos: str, eos: str):
    text, spans = "", []
    legacy = chat_format in ("phi3-bos", "phi3-medium")
    if chat_format == "phi3-bos":
        text += bos
    for role, content, _ in _checked(messages):
        if legacy:
            if role == "user":
                text += "<|user|>\n" + content + "<|end|>\n<|assistant|>\n"
            elif role == "assistant":
                spans.append(_trained_span(text, content, "<|end|>"))
                text += content + "<|end|>\n"
            # system: dropped by these templates
        elif role == "system" and chat_format == "phi3.5" and not content:
            continue
        else:
            text += f"<|{role}|>\n"
            if role == "assistant":
                spans.append(_trained_span(text, content, "<|end|>"))
            text += content + "<|end|>\n"
    if not legacy:
        text += "<|assistant|>\n" if add_generation_prompt else eos
    return text, spans


def _render_phi4_mini(messages: list[dict], add_generation_prompt: bool, eos: str):
    text, spans = "", []
    for role, content, message in _checked(messages):
        text += f"<|{role}|>"
        if role == "assistant":
            spans.append(_trained_span(text, content, "<|end|>"))
        text += content + (_tools(message) if role == "system" else "") + "<|end|>"
    return text + ("<|assistant|>" if add_generation_prompt else eos), spans


def _render_phi4(messages: list[dict], add_generation_prompt: bool):
    text, spans = "", []
    for role, content, _ in _checked(messages):
        text += f"<|im_start|>{role}<|im_sep|>"
        if role == "assistant":
            spans.append(_trained_span(text, content, "<|im_end|>"))
        text += content + "<|im_end|>"
    return text + ("<|im_start|>assistant<|im_sep|>" if add_generation_prompt else ""), spans


def _trained_span(text: str, content: str, end: str) -> tuple[int, int]:
    """Characters of an assistant message about to be appended to `text`: its content and end-of-turn token."""
    return len(text), len(text) + len(content) + len(end)


def _checked(messages: list[dict]):
    """(role, content, message) of each message, after checking its types (ValueError naming the message)."""
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] is a {type(m).__name__}; expected a dict with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"messages[{i}] has role {role!r}; expected one of {ROLES}")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content is a {type(content).__name__}; expected a string")
        yield role, content, m


def _tools(message: dict) -> str:
    """Phi-4-mini's tool list in a system message: its template puts a "tools" string between <|tool|> tags."""
    tools = message.get("tools")
    if tools is None:
        return ""
    if not isinstance(tools, str):
        raise ValueError(f"a system message's tools is a {type(tools).__name__}; expected a string (JSON text)")
    return "<|tool|>" + tools + "<|/tool|>"
