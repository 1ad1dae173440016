"""Training data: JSONL rows -> token sequences with a loss mask (DESIGN §3).

Rows are either plain text, ``{"text": ...}``, or chat turns,
``{"messages": [{"role": ..., "content": ...}, ...]}`` rendered with the tokenizer's
chat template.

Loss mask. ``loss_mask[t] = 1`` when position ``t``'s prediction (of token ``t+1``)
is trained. Text rows train every token; chat rows train only the assistant turns
(their content and end-of-turn tokens), because at inference SpAF drafts only the
model's own replies, never the user's. The last position of a sequence has no next
token in the sequence and is never trained. Every position-level loss (adapter KL/CE,
alignment state and token losses at the predicted position) uses this mask.

Sequences. With packing (default) the token streams of all rows are concatenated and
cut into ``seq_len`` windows, so no compute goes to padding; attention runs across
row boundaries inside a window, which is harmless for self-distillation because the
teacher and the drafters see exactly the same context. Without packing each row is
truncated to ``seq_len`` and right-padded (padding is masked everywhere).

Evaluation data is never trained on: files named like MT-Bench or the grounded prompt set
are refused, and rows whose text holds a passage of a packaged grounded prompt
(spaf_edge/data/grounded_prompts.jsonl: the prompt itself, or another question on the same
passage) are skipped, with a log line saying how many.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from spaf_edge.core.errors import ConfigError
from spaf_edge.core.jsonl import read_jsonl
from spaf_edge.core.prompt_sets import grounded_passages

log = logging.getLogger(__name__)
EVALUATION_NAME = re.compile(r"mt[-_ ]?bench|grounded_prompts", re.IGNORECASE)


@dataclass
class Example:
    """One rendered row: token ids and which tokens are trained targets."""

    input_ids: list[int]
    trained: list[bool]


def refuse_evaluation_data(path: str | os.PathLike) -> None:
    """Evaluation sets (MT-Bench, the grounded prompts) must never be trained on: refuse them by name."""
    if EVALUATION_NAME.search(str(path)):
        raise ConfigError(
            f"{path} looks like evaluation data (MT-Bench or the grounded prompts); training on it would "
            "contaminate every benchmark. Use training prompts instead (e.g. ../shared/data/train_prompts.jsonl)."
        )


@functools.cache
def _evaluation_passages() -> tuple[str, ...]:
    return tuple(_flatten(passage) for passage in grounded_passages())


def _flatten(text: str) -> str:
    """Runs of whitespace as one space: templates may re-wrap a passage's lines."""
    return " ".join(text.split())


def holds_evaluation_text(text: str) -> bool:
    """True when ``text`` quotes a passage of a grounded evaluation prompt (whitespace-insensitive)."""
    flat = _flatten(text)
    return any(passage in flat for passage in _evaluation_passages())


def row_texts(row: dict[str, Any]) -> list[str]:
    """The strings of a data row that could quote evaluation text: prompt, text, every message."""
    texts = [row[key] for key in ("prompt", "text") if isinstance(row.get(key), str)]
    messages = row.get("messages")
    if isinstance(messages, list):
        texts += [m["content"] for m in messages if isinstance(m, dict) and isinstance(m.get("content"), str)]
    return texts


def is_evaluation_row(row: dict[str, Any]) -> bool:
    """True for a prompt, text or chat row that quotes a grounded evaluation prompt's passage."""
    return any(holds_evaluation_text(text) for text in row_texts(row))


def render_row(row: dict[str, Any], tokenizer: Any, where: str = "row") -> Example:
    """Tokenize a text or chat row and mark its trained tokens."""
    if "messages" in row:
        return render_chat(row["messages"], tokenizer, where)
    if isinstance(row.get("prompt"), str) and not isinstance(row.get("text"), str):
        return render_prompt(row["prompt"], tokenizer)
    if isinstance(row.get("text"), str):
        ids = list(tokenizer(row["text"], add_special_tokens=True)["input_ids"])
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)  # documents end like the model's own outputs
        return Example(ids, [True] * len(ids))
    raise ConfigError(
        f"{where} has no 'text' string, 'messages' list or 'prompt' string. Each JSONL row must be "
        '{"text": ...}, {"messages": [{"role": ..., "content": ...}, ...]} or {"prompt": ...}.'
    )


def render_prompt(prompt: str, tokenizer: Any) -> Example:
    """A bare prompt row: the user turn as the chat template renders it, every token trained.

    Distillation only needs the base's distribution ``p`` on some text, not a reply
    written by the base, so a prompt file is training data as it is: no generation.
    Without a chat template the prompt is plain text.
    """
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False)
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    else:
        ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    return Example(ids, [True] * len(ids))


def render_chat(messages: Sequence[dict[str, str]], tokenizer: Any, where: str = "row") -> Example:
    """Render chat turns with the template; train only the assistant turns.

    An assistant turn's character span is found by rendering the conversation up to
    it (with the generation prompt) and through it; tokens starting inside a span are
    trained. This needs a template whose renderings are prefixes of one another, which
    holds for the common ChatML/Llama templates and is checked.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"{where} is a chat row but the tokenizer has no chat template. Use "
            '{"text": ...} rows, or a base model whose tokenizer has a chat template.'
        )
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages
    ):
        raise ConfigError(f"{where}: 'messages' must be a list of {{'role': str, 'content': str}} objects.")
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
        if not (through.startswith(before) and full.startswith(through)):
            raise ConfigError(
                f"{where}: the chat template does not render turns as prefixes of each other, so the "
                "assistant tokens cannot be located. Convert the rows to {\"text\": ...}."
            )
        spans.append((len(before), len(through)))
    if not spans:
        raise ConfigError(f"{where} has no assistant turn: nothing to train on. Add the assistant's reply.")
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    trained = [any(start <= begin < end for start, end in spans) for begin, _ in encoded["offset_mapping"]]
    return Example(list(encoded["input_ids"]), trained)


def load_examples(path: str | os.PathLike, tokenizer: Any, limit: int | None = None) -> list[Example]:
    """Render the rows of ``path`` (the first ``limit`` kept), skipping rows that quote evaluation prompts."""
    refuse_evaluation_data(path)
    examples = []
    skipped = 0
    for number, row in read_jsonl(path):
        if is_evaluation_row(row):
            skipped += 1
            continue
        examples.append(render_row(row, tokenizer, where=f"{path}:{number}"))
        if limit is not None and len(examples) >= limit:
            break
    if skipped:
        log.info("Skipped %d rows of %s that quote grounded evaluation prompts.", skipped, path)
    if not examples:
        kept = f" besides {skipped} that quote evaluation prompts" if skipped else ""
        raise ConfigError(f"{path} has no rows{kept}. Pass a JSONL file with at least one text or chat row.")
    return examples


class TokenDataset(torch.utils.data.Dataset):
    """Fixed-length sequences: ``input_ids``, ``attention_mask``, ``loss_mask``, each [N, S]."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor) -> None:
        self.input_ids = input_ids
        self.attention_mask = attention_mask
        self.loss_mask = loss_mask

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {
            "index": torch.tensor(index),
            "input_ids": self.input_ids[index],
            "attention_mask": self.attention_mask[index],
            "loss_mask": self.loss_mask[index],
        }

    def subset(self, indices: Sequence[int]) -> TokenDataset:
        rows = torch.as_tensor(list(indices), dtype=torch.long)
        return TokenDataset(self.input_ids[rows], self.attention_mask[rows], self.loss_mask[rows])

    @property
    def num_trained_positions(self) -> int:
        return int(self.loss_mask.sum())


def build_sequences(examples: Sequence[Example], seq_len: int, pad_id: int, packing: bool = True) -> TokenDataset:
    """Pack (or truncate and pad) examples into ``seq_len`` windows with loss masks."""
    if seq_len < 2:
        raise ConfigError(f"seq_len={seq_len}: need at least 2 tokens per sequence.")
    if packing:
        ids = [t for example in examples for t in example.input_ids]
        trained = [t for example in examples for t in example.trained]
        count = len(ids) // seq_len
        if count == 0:
            raise ConfigError(
                f"The data has {len(ids)} tokens, fewer than one sequence of seq_len={seq_len}. "
                "Add data or lower --seq-len."
            )
        input_ids = torch.tensor(ids[: count * seq_len]).view(count, seq_len)
        target = torch.tensor(trained[: count * seq_len]).view(count, seq_len)
        attention = torch.ones_like(input_ids)
    else:
        input_ids = torch.full((len(examples), seq_len), pad_id, dtype=torch.long)
        target = torch.zeros((len(examples), seq_len), dtype=torch.bool)
        attention = torch.zeros((len(examples), seq_len), dtype=torch.long)
        for row, example in enumerate(examples):
            length = min(seq_len, len(example.input_ids))
            input_ids[row, :length] = torch.tensor(example.input_ids[:length])
            target[row, :length] = torch.tensor(example.trained[:length])
            attention[row, :length] = 1
    loss_mask = torch.zeros(input_ids.shape, dtype=torch.float32)
    loss_mask[:, :-1] = (target[:, 1:] & attention[:, 1:].bool()).float()  # position t predicts token t+1
    return TokenDataset(input_ids, attention, loss_mask)


def split_holdout(dataset: TokenDataset, fraction: float, seed: int) -> tuple[TokenDataset, TokenDataset | None]:
    """A seeded held-out split of whole sequences; ``fraction`` 0 gives no eval set."""
    if not 0 <= fraction < 1:
        raise ConfigError(f"eval_fraction={fraction}: expected a number in [0, 1).")
    count = len(dataset)
    held = round(count * fraction)
    if fraction > 0:
        held = max(1, held)
    if held >= count:
        raise ConfigError(
            f"Only {count} sequences: too few for a held-out split of {fraction:.0%}. Add data, lower "
            "--seq-len or set --eval-fraction 0."
        )
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    train = dataset.subset(sorted(order[held:]))
    return train, (dataset.subset(sorted(order[:held])) if held else None)


def frequent_tokens(dataset: TokenDataset, size: int, vocab_size: int, always: Sequence[int] = ()) -> torch.Tensor:
    """The draft vocabulary V_d: the ``size`` most frequent trained target tokens (+ ``always``).

    ``always`` (the EOS ids) are included so drafts can end a reply. Ties break by
    token id, so the result is deterministic. Returns sorted ids, [V_d].
    """
    if not 2 <= size <= vocab_size:
        raise ConfigError(f"draft_vocab_size={size}: expected an integer in 2..{vocab_size} (the vocabulary).")
    targets = dataset.input_ids[:, 1:][dataset.loss_mask[:, :-1] > 0]
    counts = torch.bincount(targets, minlength=vocab_size).double()
    counts -= torch.arange(vocab_size, dtype=torch.double) / (2 * vocab_size)  # tie-break: lower id first
    forced = torch.tensor(sorted(set(always)), dtype=torch.long)
    if forced.numel():
        counts[forced] = float("inf")
    return torch.sort(torch.topk(counts, size).indices).values
