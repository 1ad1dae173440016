"""Text <-> token ids with the ``tokenizers`` library, and chat templates with jinja2.

Chat templates render the way transformers' ``apply_chat_template`` does: a sandboxed
jinja2 environment with ``trim_blocks``/``lstrip_blocks``, the ``loopcontrols``
extension, a ``tojson`` filter that keeps non-ASCII text, ``raise_exception`` and
``strftime_now`` globals, the tokenizer's special tokens (``bos_token``, ``eos_token``, …)
as variables, and the rendered text encoded without adding special tokens (the template
writes them).

User text never controls the conversation: special-token strings in it (``<|im_end|>``,
``</s>``) are encoded as the plain text they spell, as chat APIs do, unless the caller opts
in with ``special_tokens=True``. In a chat, each one in a message's content is swapped for a
private-use placeholder before rendering and encoded on its own afterwards; the rest of the
rendered text is encoded as before, so where no content holds such a string the ids are
exactly the template's. Text with lone surrogates (undecodable bytes kept by Python's
``surrogateescape``) has them replaced by U+FFFD. Torch-free.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2 import nodes
from jinja2.exceptions import TemplateError
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from spaf_edge.core.errors import ConfigError, ExportFormatError
from spaf_edge.core.io_names import TOKENIZER, TOKENIZER_CONFIG

SURROGATES = re.compile("[\ud800-\udfff]")
PLACEHOLDER_CHARS = range(0xE000, 0xF900)  # Unicode's private-use area
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
        specials = sorted({t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special},
                          key=len, reverse=True)  # longest first: "<|im_end|>" before a "<|im" token
        self._specials = re.compile("|".join(map(re.escape, specials))) if specials else None
        self._mode = threading.Lock()  # guards the tokenizer's encode_special_tokens switch

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
    def encode(self, text: str, add_special_tokens: bool = True, special_tokens: bool = False) -> list[int]:
        """Text -> ids. Special-token strings in ``text`` are plain text unless ``special_tokens``.

        ``add_special_tokens``: the tokenizer's own additions (e.g. a leading BOS).
        """
        text = valid_text(text)
        with self._mode:
            before = self.tokenizer.encode_special_tokens
            self.tokenizer.encode_special_tokens = not special_tokens  # True: split them as ordinary text
            try:
                return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
            finally:
                self.tokenizer.encode_special_tokens = before

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

    def encode_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, special_tokens: bool = False
    ) -> list[int]:
        """The rendered conversation's ids; special-token strings in contents are plain text unless
        ``special_tokens``."""
        hidden: list[str] = []
        if not special_tokens and self._specials is not None:
            marker = placeholder_char(messages, self.chat_template or "")

            def hide(match: re.Match) -> str:
                hidden.append(match.group())
                return f"{marker}{len(hidden) - 1}{marker}"

            messages = [
                dict(m, content=self._specials.sub(hide, m["content"])) if isinstance(m.get("content"), str) else m
                for m in messages
            ]
        rendered = self.render_chat(messages, add_generation_prompt)
        if not hidden:
            return self.encode(rendered, add_special_tokens=False, special_tokens=True)
        ids: list[int] = []
        for index, part in enumerate(re.split(f"{marker}(\\d+){marker}", rendered)):
            if index % 2:  # a placeholder: the special-token string it stands for, as plain text
                ids += self.encode(hidden[int(part)], add_special_tokens=False)
            elif part:  # template text: its special tokens are control tokens
                ids += self.encode(part, add_special_tokens=False, special_tokens=True)
        return ids

    def encode_prompt(self, text: str, chat: bool = True, special_tokens: bool = False) -> list[int]:
        """A single user turn through the chat template when there is one and ``chat``; else raw text.

        Special-token strings in ``text`` are plain text unless ``special_tokens``.
        """
        if chat and self.has_chat_template:
            return self.encode_chat([{"role": "user", "content": text}], special_tokens=special_tokens)
        return self.encode(text, special_tokens=special_tokens)


def valid_text(text: str) -> str:
    """``text`` with lone surrogates replaced by U+FFFD (the tokenizer refuses them)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return SURROGATES.sub("\ufffd", text)
    return text


def placeholder_char(messages: list[dict[str, Any]], template: str) -> str:
    """A private-use character that appears in neither the messages nor the template."""
    used = set(template).union(*(set(str(message)) for message in messages))
    for code in PLACEHOLDER_CHARS:
        if chr(code) not in used:
            return chr(code)
    raise ConfigError("The conversation uses every private-use character; cannot encode it safely.")


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
