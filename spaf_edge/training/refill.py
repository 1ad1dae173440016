"""Batched generation that refills a row as soon as its reply ends (distill's torch backend on a CPU).

``generate`` in batches keeps every row of a batch until its longest reply ends: on a 2-core CPU
only 64 % of a 64 x 256 batch's slots held reply tokens (docs/training.md). Here a row whose reply
ends is handed back at once and its slot takes the next prompt: the prompt is prefilled alone,
its keys and values are written right-aligned into the slot's cache rows (the columns before them
masked), and decoding goes on for every slot together. Columns that no slot reads any more are cut
off the left of the cache.

Each prompt draws from its own generator, seeded by the caller, so a sampled reply does not depend
on which prompts shared its batch or on where a resumed run started. Greedy replies may part from
unbatched decoding after a near-tie, as with any batched float arithmetic.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from spaf_edge.model import cache_kwarg_name

# Cut the cache's left columns once this many are unread by every slot (each cut copies the cache).
TRIM_COLUMNS = 32

Picker = Callable[[torch.Tensor, list[int]], list[int]]  # (logits [n, vocab], prompt numbers) -> tokens


@dataclass
class Slot:
    prompt: int  # position of the prompt in the caller's list
    position: int  # rotary position of the next token fed
    reply: list[int] = field(default_factory=list)


def pick_tokens(temperature: float, top_p: float, seeds: Sequence[int]) -> Picker:
    """Greedy (``temperature`` 0) or sampling at ``temperature`` within the ``top_p`` nucleus, prompt ``i``
    drawing from a generator seeded with ``seeds[i]``."""
    if temperature <= 0:
        return lambda logits, prompts: logits.argmax(-1).tolist()
    generators: dict[int, torch.Generator] = {}

    def pick(logits: torch.Tensor, prompts: list[int]) -> list[int]:
        probs = torch.softmax(logits / temperature, dim=-1)  # [n, vocab]
        tokens = []
        for row, prompt in enumerate(prompts):
            if prompt not in generators:
                generators[prompt] = torch.Generator().manual_seed(seeds[prompt])
            p = probs[row]
            if top_p < 1.0:
                sorted_p, order = p.sort(descending=True)
                keep = (sorted_p.cumsum(0) - sorted_p) < top_p  # the smallest head reaching top_p
                p = torch.zeros_like(p).scatter_(0, order[keep], sorted_p[keep])
            tokens.append(int(torch.multinomial(p, 1, generator=generators[prompt])))
        return tokens

    return pick


@torch.no_grad()
def generate_refilled(
    model: Any, prompts: Sequence[list[int]], eos_ids: Sequence[int], max_new_tokens: int, slots: int, pick: Picker,
) -> Iterator[tuple[int, list[int], str]]:
    """Yield ``(prompt number, reply tokens, finish reason)`` for every prompt, in the order replies end.

    The reply stops before its first EOS (``eos``) or after ``max_new_tokens`` tokens (``length``).
    ``slots`` prompts are decoded together; ``pick`` chooses each next token (:func:`pick_tokens`).
    """
    eos = set(eos_ids)
    pending = deque(range(len(prompts)))
    device = next(model.parameters()).device
    cache_name = cache_kwarg_name(model)
    cache = None
    mask = torch.zeros((0, 0), dtype=torch.long, device=device)  # [slots, cache columns]: 1 = read
    active: list[Slot | None] = []  # None: a slot left empty once no prompt is pending
    feed: list[int] = []  # the token each active slot feeds next

    def finished(slot: Slot, token: int) -> str | None:
        if token in eos:
            slot.reply.pop()
            return "eos"
        return "length" if len(slot.reply) >= max_new_tokens else None

    def fill(index: int) -> Iterator[tuple[int, list[int], str]]:
        """Prefill pending prompts into slot ``index`` until one does not end at once; None marks it empty."""
        nonlocal cache, mask
        while pending:
            number = pending.popleft()
            ids = torch.tensor([prompts[number]], device=device)  # [1, L]
            logits, single = step(model, input_ids=ids)
            slot = Slot(number, ids.shape[1])
            token = pick(logits, [number])[0]
            slot.reply.append(token)
            reason = finished(slot, token)
            if reason is not None:
                yield number, slot.reply, reason
                continue
            cache, mask = place(cache, mask, index, single)
            active[index], feed[index] = slot, token
            return
        active[index] = None

    first = [pending.popleft() for _ in range(min(slots, len(pending)))]
    if first:
        cache, mask, logits = prefill_padded(model, [prompts[n] for n in first])
        tokens = pick(logits, first)
        for number, ids, token in zip(first, (prompts[n] for n in first), tokens):
            active.append(Slot(number, len(ids), [token]))
            feed.append(token)
        for index, slot in enumerate(active):
            reason = finished(slot, slot.reply[-1])
            if reason is not None:
                yield slot.prompt, slot.reply, reason
                yield from fill(index)
    while True:
        if any(slot is None for slot in active):
            alive = [i for i, slot in enumerate(active) if slot is not None]
            cache, mask = select_rows(cache, mask, alive)
            active, feed = [active[i] for i in alive], [feed[i] for i in alive]
        if not active:
            return
        cache, mask = trim(cache, mask)
        mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
        positions = torch.tensor([[slot.position] for slot in active], device=device)  # [n, 1]
        logits, cache = step(model, input_ids=torch.tensor([[t] for t in feed], device=device), attention_mask=mask,
                             position_ids=positions, **{cache_name: cache})
        tokens = pick(logits, [slot.prompt for slot in active])
        for index, (slot, token) in enumerate(zip(list(active), tokens)):
            slot.position += 1
            slot.reply.append(token)
            feed[index] = token
            reason = finished(slot, token)
            if reason is not None:
                yield slot.prompt, slot.reply, reason
                yield from fill(index)


def step(model: Any, **inputs: Any) -> tuple[torch.Tensor, Any]:
    """One forward that keeps its cache (a cache passed in under :func:`cache_kwarg_name`'s name grows):
    (last position's logits [n, vocab] in fp32, the cache)."""
    out = model(**inputs, use_cache=True, logits_to_keep=1)
    cache = out.cache if "cache" in out else out.past_key_values
    return out.logits[:, -1].float(), cache


def prefill_padded(model: Any, prompts: list[list[int]]) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """One left-padded prefill of ``prompts``: (cache, mask [n, L], last logits [n, vocab])."""
    device = next(model.parameters()).device
    ids, mask = (tensor.to(device) for tensor in left_pad(prompts, 0))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits, cache = step(model, input_ids=ids, attention_mask=mask, position_ids=positions)
    return cache, mask, logits


def left_pad(prompts: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``prompts`` right-aligned in one tensor: (ids [n, L] with ``pad_id`` before each prompt, mask [n, L])."""
    width = max(len(ids) for ids in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    return ids, mask


def place(cache: Any, mask: torch.Tensor, index: int, single: Any) -> tuple[Any, torch.Tensor]:
    """Write a one-prompt cache right-aligned into row ``index`` of ``cache`` (widened on the left if the
    prompt is longer than the cache) and mark only its columns as read."""
    length = single.layers[0].keys.shape[-2]
    short = length - mask.shape[1]
    if short > 0:
        for layer in cache.layers:
            layer.keys = torch.nn.functional.pad(layer.keys, (0, 0, short, 0))
            layer.values = torch.nn.functional.pad(layer.values, (0, 0, short, 0))
        mask = torch.nn.functional.pad(mask, (short, 0))
    for layer, new in zip(cache.layers, single.layers):
        layer.keys[index, :, -length:] = new.keys[0]
        layer.values[index, :, -length:] = new.values[0]
    mask[index] = 0
    mask[index, -length:] = 1
    return cache, mask


def select_rows(cache: Any, mask: torch.Tensor, rows: list[int]) -> tuple[Any, torch.Tensor]:
    index = torch.tensor(rows, dtype=torch.long, device=mask.device)
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[index], layer.values[index]
    return cache, mask[index]


def trim(cache: Any, mask: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """Cut the left columns no slot reads, once there are ``TRIM_COLUMNS`` of them."""
    unread = int(mask.any(0).long().argmax())
    if unread < TRIM_COLUMNS:
        return cache, mask
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[:, :, unread:], layer.values[:, :, unread:]
    return cache, mask[:, unread:]
