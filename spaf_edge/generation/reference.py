"""PyTorch reference of SpAF decoding (DESIGN §4): the oracle the engine is tested against.

A :class:`TorchBackend` of the one loop (:func:`spaf_edge.decoding.loop.decode`), drafting
through the SpAF proposer over :class:`spaf_edge.generation.drafting.TorchDraftCalls`.
Batch 1 only (asserted). State between steps: committed tokens ``x_0 .. x_T``; both KV
caches hold positions ``0 .. T-1``; ``x_T`` is pending.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from spaf_edge.core.errors import ConfigError, ContextLengthError
from spaf_edge.core.stats import GenerationStats
from spaf_edge.decoding.loop import DecodeResult, Proposal, decode, resolve_settings
from spaf_edge.decoding.proposers import LookupProposer, Proposers
from spaf_edge.decoding.spaf import SpAFProposer
from spaf_edge.decoding.tree import DraftTree
from spaf_edge.generation.drafting import TorchDraftCalls
from spaf_edge.model import SpAFModel

DECODING_KEYS = ("temperature", "top_k", "top_p", "num_draft_tokens", "serial_parallel_transition",
                 "draft_stop_threshold")


class TorchBackend:
    """Both stacks of ``model`` with their caches, for one generation of at most ``max_length`` positions."""

    def __init__(self, model: SpAFModel, max_length: int, eos: frozenset[int], trees: bool = False) -> None:
        self.model = model
        self.eos = eos
        self._max_length = max_length
        self.tokens: list[int] = []
        self.lower = model.new_cache(model.lower_layer_ids(), max_length)
        self.upper = model.new_cache(model.upper_layer_ids(), max_length)
        # Exact states of T-1 (and the top state of T-2) that drafting starts from: [1, 1, H], None before x_0
        self.top: torch.Tensor | None = None
        self.hidden: torch.Tensor | None = None
        self.top2: torch.Tensor | None = None
        # The last upper call's rows: cutoff states and the top states the drafter reads, [1, R, H]
        self.call_hidden: torch.Tensor | None = None
        self.call_top: torch.Tensor | None = None
        self.serial_hidden: list[torch.Tensor] = []  # h(T .. T+e-1) from this step's serial drafts
        self.proposer = Proposers(SpAFProposer(TorchDraftCalls(self)), LookupProposer(lambda: self.tokens),
                                  trees)

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def position(self) -> int:
        """T: the position of the pending token (= valid cache length)."""
        return len(self.tokens) - 1

    @torch.no_grad()
    def prefill(self, prompt_ids: Sequence[int], reuse_cache: bool, active: bool) -> None:
        if reuse_cache:
            raise ConfigError("The PyTorch reference keeps no cache between generations (reuse_cache).")
        self.tokens = list(prompt_ids)
        self.proposer.start(0, active)
        if len(prompt_ids) == 1:
            return
        model = self.model
        ids = torch.tensor([list(prompt_ids[:-1])], device=model.base_device)  # [1, P-1]
        self._run_upper(model.run_layers(model.embed(ids), self.lower))
        if active:
            self.proposer.prefilled(0, len(prompt_ids) - 1)
        last = len(prompt_ids) - 2
        self._keep_exact(last, last - 1 if last else None)

    @torch.no_grad()
    def verify(self, proposal: Proposal) -> np.ndarray:
        """One batched target pass over the tree's nodes (positions ``T + depth``), each seeing the
        committed positions and its ancestors. Returns logits [N, V] (float32)."""
        model, tree, exact = self.model, proposal.tree, proposal.exact
        pieces, self.serial_hidden = self.serial_hidden, []
        shape = None if tree.is_chain else self._tree_shape(tree)
        if exact < len(tree):
            ids = torch.tensor([tree.tokens[exact:].tolist()], device=model.base_device)  # [1, N-e]
            rows = None if shape is None else (shape[0][exact:], shape[1][exact:])
            pieces.append(model.run_layers(model.embed(ids), self.lower, rows))
        top = self._run_upper(torch.cat(pieces, dim=1), shape)
        return model.lm_head_rows(top)[0].float().cpu().numpy()

    def commit(self, proposal: Proposal, rows: list[int], bonus: int) -> None:
        valid = self.position + len(rows)  # positions T .. T+n now hold accepted tokens
        if not proposal.tree.is_chain:  # the accepted path's cache rows move to T .. T+n
            for cache in (self.lower, self.upper):
                cache.keep_rows(self.position, rows)
        self.tokens.extend([*(proposal.tree.token(row) for row in rows[1:]), bonus])
        self._keep_exact(rows[-1], rows[-2] if len(rows) > 1 else None)
        self.lower.rewind_to(valid)
        self.upper.rewind_to(valid)

    def _tree_shape(self, tree: DraftTree) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary positions int64 [N] and ancestor-or-self visibility bool [N, N] of the tree's nodes."""
        return torch.from_numpy(tree.positions(self.position)), torch.from_numpy(tree.ancestor_mask())

    def _run_upper(self, hidden: torch.Tensor, tree: tuple[torch.Tensor, torch.Tensor] | None = None
                   ) -> torch.Tensor:
        """The upper stack on cutoff states [1, R, H] at the next positions (``tree``: see
        :meth:`SpAFModel.run_layers`). Returns the top states [1, R, H] (the LM head's input); the
        call's rows are kept with the top states the drafter reads."""
        top, self.call_top = self.model.run_upper(hidden, self.upper, tree)
        self.call_hidden = hidden
        return top

    def _keep_exact(self, row: int, before: int | None) -> None:
        """The states of the last call's row ``row`` become those of ``T-1``; row ``before``'s top state
        (``f(T-1)`` when None) that of ``T-2``."""
        self.top2 = self.top if before is None else self.call_top[:, before:before + 1]
        self.top = self.call_top[:, row:row + 1]
        self.hidden = self.call_hidden[:, row:row + 1]


def check_context(prompt_length: int, max_new_tokens: int, max_context: int) -> None:
    if prompt_length < 1:
        raise ContextLengthError("The prompt is empty; give at least one token.")
    if max_new_tokens < 1:
        raise ContextLengthError(f"max_new_tokens={max_new_tokens}: ask for at least 1 new token.")
    if prompt_length + max_new_tokens > max_context:
        raise ContextLengthError(
            f"Prompt ({prompt_length} tokens) + max_new_tokens ({max_new_tokens}) = "
            f"{prompt_length + max_new_tokens} exceeds the context of {max_context} tokens. "
            "Shorten the prompt or lower max_new_tokens."
        )


@torch.no_grad()
def spaf_generate(
    model: SpAFModel,
    input_ids: Sequence[int] | torch.Tensor,
    max_new_tokens: int = 128,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    num_draft_tokens: int | None = None,
    serial_parallel_transition: int | None = None,
    draft_stop_threshold: float | None = None,
    eos_token_ids: Sequence[int] | None = None,
    max_context: int | None = None,
    on_tokens: Callable[[list[int]], None] | None = None,
    trees: bool = False,
    **tree: Any,
) -> DecodeResult:
    """Generate up to ``max_new_tokens`` tokens; settings default to ``model.config``'s.

    ``trees``: verify draft trees (else chains, as the engine does where trees are not exact).
    ``tree``: ``proposers``, ``tree_width``, ``lookup_branches``, ``max_nodes``, ``lookup_min_match``,
    ``lookup_depth``, ``lookup_start`` (:func:`spaf_edge.decoding.loop.resolve_settings`).
    """
    defaults = {key: getattr(model.config, key) for key in DECODING_KEYS}
    settings = resolve_settings(defaults, temperature, top_p, top_k, num_draft_tokens, serial_parallel_transition,
                                draft_stop_threshold, **tree)
    prompt = _as_token_list(input_ids)
    check_context(len(prompt), max_new_tokens, max_context or model.max_context)
    eos = frozenset(eos_token_ids if eos_token_ids is not None else default_eos_ids(model))
    backend = TorchBackend(model, len(prompt) + max_new_tokens, eos, trees)
    result = DecodeResult(tokens=[], stats=GenerationStats(prompt_tokens=len(prompt)), prompt_ids=prompt)
    for new in decode(backend, prompt, max_new_tokens, settings, np.random.default_rng(seed), result):
        if on_tokens is not None:
            on_tokens(new)
    return result


def default_eos_ids(model: SpAFModel) -> list[int]:
    """EOS ids from the base's generation config, config and tokenizer."""
    ids: set[int] = set()
    sources = [getattr(model.base, "generation_config", None), model.base.config]
    for source in sources:
        value = getattr(source, "eos_token_id", None)
        ids.update([value] if isinstance(value, int) else value or [])
    if model.tokenizer is not None and model.tokenizer.eos_token_id is not None:
        ids.add(model.tokenizer.eos_token_id)
    return sorted(ids)


def _as_token_list(input_ids: Sequence[int] | torch.Tensor) -> list[int]:
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 2:
            assert input_ids.shape[0] == 1, "spaf_generate is batch-1: pass one sequence"
            input_ids = input_ids[0]
        return [int(t) for t in input_ids.tolist()]
    return [int(t) for t in input_ids]
