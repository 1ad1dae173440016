"""Turning user text into prompt token ids with a transformers tokenizer."""

from __future__ import annotations

from typing import Any


def encode_prompt(tokenizer: Any, text: str, chat: bool = True) -> list[int]:
    """Apply the chat template (a single user turn) when the tokenizer has one and ``chat``."""
    if chat and getattr(tokenizer, "chat_template", None):
        encoded = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, return_dict=True
        )
        return list(encoded["input_ids"])
    return list(tokenizer(text)["input_ids"])
