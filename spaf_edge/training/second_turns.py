"""Second turns for self-distillation: a follow-up request on the base's own first reply.

``spaf-edge distill --second-turns`` reads first-turn rows written by distill (a user prompt and
the base's reply), adds one follow-up request from :data:`FOLLOW_UPS` (chosen per row from the
seed and the row's ``prompt_index``, so a resumed or sharded run picks the same), and has the
base reply to the whole conversation. Training on such rows shows the drafter the base's
replies with an earlier exchange in context, as in chat use and MT-Bench's second turns.

The requests are generic (they fit a sum, a summary, code or an essay) and written for this
project. Rows whose first reply was cut at the token limit are left out: a follow-up to a
reply that stops mid-sentence is not a conversation a user has.
"""

from __future__ import annotations

import logging
import os
import random
from typing import Any

from spaf_edge.core.errors import ConfigError
from spaf_edge.core.jsonl import read_jsonl
from spaf_edge.training.data import is_evaluation_row, refuse_evaluation_data
from spaf_edge.training.distill import PromptRow, group_seed

log = logging.getLogger(__name__)

FOLLOW_UPS = (
    "Can you explain your answer in simpler terms?",
    "Summarize your previous answer in two sentences.",
    "Give a concrete example that illustrates your answer.",
    "Rewrite your answer as a short bulleted list.",
    "What is the most important point of your answer, and why?",
    "Check your answer step by step. Is anything in it wrong or missing?",
    "Expand on your answer with more detail.",
    "Rewrite your answer in a more formal tone.",
    "How would you explain this to a ten-year-old?",
    "Make your answer shorter, keeping only what is essential.",
    "Suggest a different way to answer or solve this, and compare it with yours.",
    "What question would a curious reader ask next about this? Answer it too.",
)
# Carried from the first-turn row into the second-turn one (attribution, where the prompt came from).
CARRIED = ("source", "license")


def follow_up(seed: int, prompt_index: int) -> str:
    """The follow-up request of a row: fixed by the seed and the row, whatever else is selected."""
    return FOLLOW_UPS[random.Random(group_seed(seed, prompt_index)).randrange(len(FOLLOW_UPS))]


def first_turn(row: dict[str, Any]) -> list[dict[str, str]] | None:
    """A distill row's user prompt and reply as chat messages; None when the row is not one."""
    messages = row.get("messages")
    if not isinstance(messages, list) or len(messages) != 2 or not isinstance(row.get("prompt_index"), int):
        return None
    if not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
        return None
    if [m.get("role") for m in messages] != ["user", "assistant"]:
        return None
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_first_turns(path: str | os.PathLike, seed: int) -> list[PromptRow]:
    """The first-turn rows of a distill output as second-turn prompts (index: the row's ``prompt_index``)."""
    refuse_evaluation_data(path)
    rows, cut, quoting, seen = [], 0, 0, set()
    for number, row in read_jsonl(path):
        history = first_turn(row)
        if history is None:
            raise ConfigError(
                f"{path}:{number} is not a first-turn row of `spaf-edge distill` (messages: one user prompt and the "
                "base's reply; an integer prompt_index). --second-turns reads the output of a first-turn distill."
            )
        if row.get("finish_reason") == "length":
            cut += 1
            continue
        if is_evaluation_row(row):
            quoting += 1
            continue
        index = row["prompt_index"]
        if index in seen:  # joined shards that overlap: follow up the first copy only
            continue
        seen.add(index)
        extra = {key: row[key] for key in CARRIED if key in row} | {"turn": 2}
        rows.append(PromptRow(index, follow_up(seed, index), extra, history))
    if cut or quoting:
        log.info("Left out %d first turns cut at the token limit and %d quoting evaluation prompts.", cut, quoting)
    if not rows:
        raise ConfigError(f"{path} has no complete first turns to follow up (cut at the token limit: {cut}).")
    return rows
