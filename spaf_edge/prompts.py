"""Turning user text into prompt token ids with a transformers tokenizer.

The same rules as the engine's (:class:`spaf_edge.runtime.tokenizer.TextTokenizer`, which
does the work): the chat template rendered with the runtime's template engine, and
special-token strings in the user's text (``<|im_end|>``, ...) encoded as plain text unless
``special_tokens``, so that text cannot end the user's turn or start another.
"""

from __future__ import annotations

from typing import Any

from spaf_edge.core.errors import ConfigError


def encode_prompt(tokenizer: Any, text: str, chat: bool = True, special_tokens: bool = False) -> list[int]:
    """Apply the chat template (a single user turn) when the tokenizer has one and ``chat``.

    A slow (Python) tokenizer has no ``tokenizers`` backend: it is used through transformers,
    where special-token strings in the text act as special tokens.
    """
    if getattr(tokenizer, "backend_tokenizer", None) is not None:
        return text_tokenizer(tokenizer).encode_prompt(text, chat=chat, special_tokens=special_tokens)
    if chat and getattr(tokenizer, "chat_template", None):
        encoded = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, return_dict=True
        )
        return list(encoded["input_ids"])
    return list(tokenizer(text)["input_ids"])


def encode_conversation(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Earlier turns and a last user turn through the chat template, ready for the assistant's reply.

    Special-token strings in the contents are plain text, as in :func:`encode_prompt`.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("A conversation of several turns needs a chat template; this tokenizer has none.")
    if getattr(tokenizer, "backend_tokenizer", None) is not None:
        return text_tokenizer(tokenizer).encode_chat(messages)
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
    return list(encoded["input_ids"])


def text_tokenizer(tokenizer: Any):
    """The engine's :class:`TextTokenizer` over a transformers fast tokenizer (its backend, template, tokens)."""
    from spaf_edge.runtime.tokenizer import SPECIAL_TOKEN_KEYS, TextTokenizer

    template = getattr(tokenizer, "chat_template", None)
    specials = {key: getattr(tokenizer, key, None) for key in SPECIAL_TOKEN_KEYS}
    return TextTokenizer(tokenizer.backend_tokenizer, template if isinstance(template, str) else None,
                         {key: value for key, value in specials.items() if isinstance(value, str)})
