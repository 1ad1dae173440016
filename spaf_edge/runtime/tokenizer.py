"""Text <-> token ids with the ``tokenizers`` library, and chat templates with jinja2.

Chat templates render the way transformers' ``apply_chat_template`` does: a sandboxed
jinja2 environment with ``trim_blocks``/``lstrip_blocks``, the ``loopcontrols``
extension, a ``tojson`` filter that keeps non-ASCII text, ``raise_exception`` and
``strftime_now`` globals, the tokenizer's special tokens (``bos_token``, ``eos_token``, …)
as variables, and the rendered text encoded without adding special tokens (the template
writes them). Torch-free.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2 import nodes
from jinja2.exceptions import TemplateError
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from spaf_edge.errors import ConfigError, ExportFormatError
from spaf_edge.io_names import TOKENIZER, TOKENIZER_CONFIG

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class _GenerationBlock(Extension):
    """``{% generation %}…{% endgeneration %}`` (marks assistant text in training templates): render the body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message: str):
    raise TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def compile_chat_template(source: str):
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except TemplateError as exc:
        raise ExportFormatError(f"The export's chat template does not parse ({exc}). Re-export the model.") from exc


class TextTokenizer:
    def __init__(self, tokenizer: Tokenizer, chat_template: str | None = None, special_tokens: dict | None = None):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})  # e.g. {"bos_token": "<s>", "eos_token": "</s>"}
        self._template = compile_chat_template(chat_template) if chat_template else None

    @classmethod
    def from_folder(cls, folder: str | Path, chat_template: str | None = None) -> TextTokenizer:
        folder = Path(folder)
        try:
            tokenizer = Tokenizer.from_file(str(folder / TOKENIZER))
        except Exception as exc:  # tokenizers raises a bare Exception for unreadable files
            raise ExportFormatError(
                f"Cannot read {folder / TOKENIZER} ({exc}). Re-run `spaf-edge export`."
            ) from exc
        config: dict[str, Any] = {}
        if (folder / TOKENIZER_CONFIG).is_file():
            try:
                config = json.loads((folder / TOKENIZER_CONFIG).read_text())
            except json.JSONDecodeError as exc:
                raise ExportFormatError(f"{folder / TOKENIZER_CONFIG} is corrupt ({exc}). Re-export.") from exc
        template = chat_template or config.get("chat_template")
        return cls(tokenizer, template if isinstance(template, str) else None, special_tokens_of(config))

    # ---- text -------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ---- chat -------------------------------------------------------------
    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        if self._template is None:
            raise ConfigError("This model has no chat template; pass chat=False (--raw) to use the prompt as is.")
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens
            )
        except TemplateError as exc:
            raise ConfigError(f"The chat template rejected the conversation: {exc}") from exc

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.render_chat(messages, add_generation_prompt), add_special_tokens=False)

    def encode_prompt(self, text: str, chat: bool = True) -> list[int]:
        """A single user turn through the chat template when there is one and ``chat``; else raw text."""
        if chat and self.has_chat_template:
            return self.encode_chat([{"role": "user", "content": text}])
        return self.encode(text)


def special_tokens_of(config: dict[str, Any]) -> dict[str, str]:
    """``bos_token`` etc. from a tokenizer_config.json (plain strings or ``{"content": ...}``)."""
    tokens = {}
    for key in SPECIAL_TOKEN_KEYS:
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            tokens[key] = value
    return tokens
