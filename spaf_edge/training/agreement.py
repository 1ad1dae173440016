"""Draft agreement: how often each drafter's top-1 token is the base's next token.

Measured teacher-forced on the base model's own greedy replies to evaluation prompts
(default: the packaged MT-Bench first turns, which training refuses). At every reply
position ``t`` the base's greedy token is ``argmax p_t``; the drafters are scored as
they are used while drafting (DESIGN §4):

- ``first``: the adapter on the exact cutoff state, reading the exact top state of the
  position before: ``argmax head(a(h(t), f(t-1)))`` — a serial draft;
- ``aligned_r`` (r = 1 .. R): an aligned draft ``r`` steps after the last exact state:
  ``ĥ(t) = AH(e(x_t), h̄(t-1))`` chained ``r`` times from ``h(t-r)``, the adapter reading
  the top state drafted one step earlier.

Greedy agreement bounds acceptance: draft ``j`` of a step is accepted only if it and
every draft before it agree. Replies are generated once per base model and prompt set
and cached (``cache_dir()/agreement``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from spaf_edge.core.progress import progress_bar
from spaf_edge.model import SpAFModel
from spaf_edge.training.features import compute_base_features, previous_exact_tops


@dataclass
class ReferenceReply:
    prompt_ids: list[int]
    reply_ids: list[int]  # the base's greedy reply (EOS cut off)
    category: str = "all"


@dataclass
class AgreementReport:
    exit_layer: int
    positions: int  # reply positions scored by ``first``
    first: float  # agreement of the first (serial) draft
    aligned: list[float] = field(default_factory=list)  # aligned_1 .. aligned_R
    by_category: dict[str, float] = field(default_factory=dict)  # ``first`` per prompt category

    def to_dict(self) -> dict:
        return {
            "exit_layer": self.exit_layer, "positions": self.positions, "first": round(self.first, 4),
            "aligned": [round(value, 4) for value in self.aligned],
            "first_by_category": {key: round(value, 4) for key, value in self.by_category.items()},
        }


def reference_replies(
    model: SpAFModel, prompts: Sequence[tuple[str, list[int]]], max_new_tokens: int, batch_size: int = 8,
    cache: Path | None = None, progress: bool = True,
) -> list[ReferenceReply]:
    """The base's greedy replies to ``(category, prompt_ids)`` pairs, cached in ``cache`` when given."""
    from spaf_edge.core.atomic import atomic_write_text
    from spaf_edge.training.distill import eos_token_ids, generate_batch

    key = hashlib.sha256(json.dumps([model.fingerprint, max_new_tokens, list(prompts)]).encode()).hexdigest()[:16]
    path = cache / f"replies-{key}.jsonl" if cache is not None else None
    if path is not None and path.is_file():
        return [ReferenceReply(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
    tokenizer = model.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = eos_token_ids(model.base, tokenizer)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i][1]))  # batches of similar length pad little
    replies: dict[int, ReferenceReply] = {}
    for start in progress_bar(range(0, len(order), batch_size), desc="reference replies", disable=not progress):
        rows = order[start:start + batch_size]
        outputs = generate_batch(model.base, [prompts[i][1] for i in rows], pad_id, eos, max_new_tokens, 0.0, 1.0)
        for i, (tokens, _) in zip(rows, outputs):
            replies[i] = ReferenceReply(list(prompts[i][1]), tokens, prompts[i][0])
    result = [replies[i] for i in range(len(prompts))]
    if path is not None:
        atomic_write_text(path, "".join(json.dumps(reply.__dict__) + "\n" for reply in result))
    return result


@torch.no_grad()
def measure_agreement(
    model: SpAFModel, replies: Sequence[ReferenceReply], aligned_steps: int = 3, exit_layer: int | None = None,
) -> AgreementReport:
    """Top-1 agreement of the first and aligned drafts with the base's greedy token (see module doc)."""
    k = exit_layer or model.cutoff
    vocab = model.draft_vocab if model.draft_vocab.numel() else None
    hits = torch.zeros(aligned_steps + 1, dtype=torch.float64)
    counts = torch.zeros_like(hits)
    categories: dict[str, list[float]] = {}
    for reply in replies:
        if not reply.reply_ids:
            continue
        ids = torch.tensor([reply.prompt_ids + reply.reply_ids], device=model.base_device)  # [1, S]
        features = compute_base_features(model, ids)
        hidden, final = features.cutoff[k], features.final  # [1, S, H]
        target = model.lm_head_rows(final).argmax(-1)  # [1, S]: argmax p_t
        scored = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
        scored[:, len(reply.prompt_ids) - 1:-1] = True  # positions whose next token is a reply token

        def draft_tokens(states: torch.Tensor) -> torch.Tensor:
            logits = model.lm_head_rows(model.top_state(states), vocab)
            best = logits.argmax(-1)
            return vocab[best] if vocab is not None else best

        exact_top = previous_exact_tops(model, features, k)
        context = model.adapter_context(hidden, exact_top, k)
        states = model.adapt(hidden, k, exact_top, context=context)  # [1, S, H]
        matched, positions = ((draft_tokens(states) == target) & scored).sum().item(), scored.sum().item()
        hits[0] += matched
        counts[0] += positions
        category = categories.setdefault(reply.category, [0.0, 0.0])
        category[0] += matched
        category[1] += positions
        previous = hidden
        for step in range(1, min(aligned_steps + 1, ids.shape[1])):
            predicted = model.align(ids[:, step:], previous[:, :-1], k)  # positions step .. S-1
            # The adapter reads the top drafted a step earlier (and exact keys of earlier positions).
            states = model.adapt(predicted, k, model.top_state(states[:, :-1]), offset=step, context=context)
            valid = scored[:, step:]
            hits[step] += ((draft_tokens(states) == target[:, step:]) & valid).sum().item()
            counts[step] += valid.sum().item()
            previous = predicted
    rates = (hits / counts.clamp(min=1)).tolist()
    return AgreementReport(
        exit_layer=k, positions=int(counts[0]), first=rates[0], aligned=rates[1:],
        by_category={name: h / max(c, 1) for name, (h, c) in sorted(categories.items())},
    )
