"""The one speculative loop: propose -> verify -> accept -> commit (DESIGN §4).

The PyTorch reference (:mod:`spaf_edge.generation.reference`) and the ONNX Runtime
engine (:mod:`spaf_edge.runtime.decoder`) are two :class:`Backend` s of this loop; the
drafts come from a :class:`Proposer` (the SpAF drafter, :mod:`spaf_edge.decoding.spaf`).
The loop itself holds no model state: committed tokens and caches live in the backend,
a drafter's own state (e.g. an attending adapter's cache) in its proposer. Torch-free.

State between steps: committed tokens ``x_0 .. x_T``; the backend's caches hold positions
``0 .. T-1``; ``x_T`` is pending.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from spaf_edge.core.config import validate_drafting
from spaf_edge.core.errors import ConfigError
from spaf_edge.core.sampling import SamplingParams, logits_to_probs
from spaf_edge.core.stats import GenerationStats
from spaf_edge.decoding.tree import DraftTree, accept_tree

MODES = ("spaf", "greedy")  # greedy: plain decoding, one token per full pass (the same-backend baseline)
PROPOSERS = ("spaf", "lookup")  # who drafts (spaf_edge.decoding.proposers), joined by '+' in settings


@dataclass(frozen=True)
class DecodeSettings:
    params: SamplingParams
    num_draft_tokens: int
    serial_parallel_transition: int
    draft_stop_threshold: float | None
    mode: str  # one of MODES
    proposers: tuple[str, ...] = ("spaf", "lookup")  # of PROPOSERS
    tree_width: int = 1  # SpAF candidates per depth: its draft plus tree_width - 1 runner-up leaves
    lookup_branches: int = 2  # lookup continuations merged into the tree
    lookup_min_match: int = 2  # chains only: a lookup branch replaces SpAF's chain when matched by this many tokens
    lookup_depth: int = 16  # tokens a lookup branch copies at most (SpAF drafts num_draft_tokens)
    lookup_start: int = 4  # ... after a step that did not accept a whole lookup chain; doubled after one that did
    max_nodes: int = 16  # candidates in a tree at most (the pending token not counted)
    # SpAF drafts a chain keeps below draft_stop_threshold: 1 where a one-row verify call runs a
    # second row anyway (an engine that pads one-row calls), so that row checks a draft for free
    min_drafts: int = 0

    def describe(self) -> str:
        """One line for reports, e.g. ``spaf+lookup, N=4 s=0 eta=0.3, lookup match 2, copies 4..16``."""
        sampling = f"temperature {self.params.temperature:g}, top-p {self.params.top_p:g}"
        if self.mode != "spaf":
            return "plain greedy" if self.params.greedy else f"plain sampling, {sampling}"
        eta = "off" if self.draft_stop_threshold is None else f"{self.draft_stop_threshold:g}"
        parts = ["+".join(self.proposers)]
        if "spaf" in self.proposers:
            parts.append(f"N={self.num_draft_tokens} s={self.serial_parallel_transition} eta={eta}")
            if self.min_drafts and self.draft_stop_threshold is not None:
                parts.append(f"keeps {self.min_drafts} below eta")
        if "lookup" in self.proposers:
            parts.append(f"lookup match {self.lookup_min_match}, copies {self.lookup_start}..{self.lookup_depth}")
        if self.tree_width > 1:
            parts.append(f"tree width {self.tree_width}, {self.max_nodes} nodes")
        if not self.params.greedy:
            parts.append(sampling)
        return ", ".join(parts)


@dataclass
class Proposal:
    """A draft tree after the pending token (node 0; a chain is a tree too), each candidate with its ``q``."""

    tree: DraftTree
    # Nodes 0 .. exact-1 are a chain (node i at depth i) whose cutoff states the backend already
    # computed (serial drafts): the verify pass continues after them.
    exact: int = 0

    @property
    def tokens(self) -> list[int]:
        """The candidates in node order (a chain's drafts ``d_1 .. d_D``)."""
        return [int(token) for token in self.tree.tokens[1:]]


@dataclass
class DecodeResult:
    tokens: list[int]  # new tokens only
    stats: GenerationStats
    text: str | None = None  # None when there is no tokenizer
    stop_reason: str = ""  # "eos" | "max_new_tokens" | "context"
    prompt_ids: list[int] = field(default_factory=list)


class Proposer(Protocol):
    """Proposes drafts; told about every exact state the backend computes, so it can keep its own."""

    def start(self, shared: int, active: bool) -> int:
        """Before a prefill that keeps the backend's first ``shared`` positions: returns how many
        of them the proposer's own state still covers (the backend recomputes the rest).
        ``active`` is False when this generation does not draft (plain greedy mode)."""

    def prefilled(self, begin: int, rows: int) -> None:
        """After a prefill call on positions ``begin .. begin+rows-1`` (their exact states are the call's rows)."""

    def propose(self, budget: int, settings: DecodeSettings, rng: np.random.Generator) -> Proposal:
        """Drafts after the pending token, at most ``budget`` deep (each proposer's own depth applies too)."""

    def accepted(self, proposal: Proposal, rows: list[int]) -> None:
        """After verify, before commit: the verify call's ``rows`` (nodes) hold positions ``T .. T+n``, exact."""


class Backend(Protocol):
    """A base model split at the cutoff, with caches: the PyTorch reference or the ORT engine."""

    tokens: list[int]  # committed x_0 .. x_T
    eos: frozenset[int]
    proposer: Proposer | None  # the drafts' source; None: plain decoding only

    @property
    def max_length(self) -> int:
        """Positions a generation may use."""

    def prefill(self, prompt_ids: Sequence[int], reuse_cache: bool, active: bool) -> None:
        """Both stacks on ``prompt[:-1]``; the last prompt token becomes pending. The proposer is
        told (:meth:`Proposer.start`, and :meth:`Proposer.prefilled` when ``active``: it will draft)."""

    def verify(self, proposal: Proposal) -> np.ndarray:
        """One target pass over the tree's nodes: logits [N, V] (read before the next call)."""

    def commit(self, proposal: Proposal, rows: list[int], bonus: int) -> None:
        """Append the accepted path (the call's ``rows`` = nodes ``0, path..``) and the bonus; the
        caches keep positions ``.. T+n`` (a tree's accepted rows moved into place)."""


class TargetProbs:
    """Processed target distributions of the tree's nodes, each computed when first read.

    :func:`spaf_edge.decoding.tree.accept_tree` reads only the nodes it visits, so the rest
    are never computed (each costs a float64 pass over the vocabulary, plus a partial sort
    with top-p). Row ``j`` equals ``logits_to_probs(logits, params)[j]``; greedy gives the logits row
    itself, whose argmax (all greedy acceptance reads) is that one-hot's.
    """

    def __init__(self, logits: np.ndarray, params: SamplingParams) -> None:
        self.logits = logits  # [N, V]
        self.params = params
        self._rows: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.logits)

    def __getitem__(self, j: int) -> np.ndarray:
        if self.params.greedy:  # greedy acceptance reads only the argmax, the logits' own: no one-hot needed
            return self.logits[j]
        row = self._rows.get(j)
        if row is None:
            row = self._rows[j] = logits_to_probs(self.logits[j], self.params)
        return row


def decode(
    backend: Backend,
    prompt_ids: list[int],
    max_new_tokens: int,
    settings: DecodeSettings,
    rng: np.random.Generator,
    result: DecodeResult,
    reuse_cache: bool = False,
) -> Iterator[list[int]]:
    """Generate into ``result``, yielding the tokens each verify step commits.

    Plain greedy mode (``settings.mode == "greedy"``) proposes nothing: one full pass per token.
    """
    stats, params = result.stats, settings.params
    proposer = backend.proposer
    drafting = proposer is not None and settings.mode == "spaf"
    start = time.perf_counter()
    backend.prefill(prompt_ids, reuse_cache, drafting)
    stats.prefill_seconds = time.perf_counter() - start
    generated = result.tokens
    result.stop_reason = "max_new_tokens"
    while len(generated) < max_new_tokens:
        position = len(backend.tokens) - 1  # T
        if position >= backend.max_length:
            result.stop_reason = "context"
            break
        room = backend.max_length - 1 - position  # cache rows a verify pass may still write after x_T
        budget = min(max_new_tokens - len(generated) - 1, room)  # how deep a proposal may go
        if drafting and budget > 0:
            step = settings if settings.max_nodes <= room else replace(settings, max_nodes=room)
            proposal = proposer.propose(budget, step, rng)
        else:
            proposal = Proposal(DraftTree(backend.tokens[-1]))
        tree = proposal.tree
        target_probs = TargetProbs(backend.verify(proposal), params)  # p of every node, rows on demand
        path, bonus = accept_tree(tree, target_probs, params, rng)
        rows = [0, *path]  # the verify call's rows of positions T .. T+n
        if drafting:
            proposer.accepted(proposal, rows)
        backend.commit(proposal, rows, bonus)
        stats.record(int(tree.depths.max()), len(path), len(tree) - 1)
        new, finished = cut_at_eos([*(tree.token(node) for node in path), bonus], backend.eos)
        generated.extend(new)
        stats.new_tokens = len(generated)
        stats.wall_seconds = time.perf_counter() - start
        stats.first_token_seconds = stats.first_token_seconds or stats.wall_seconds
        yield new
        if finished:
            result.stop_reason = "eos"
            break
    stats.wall_seconds = time.perf_counter() - start


def resolve_settings(
    defaults: Mapping[str, Any],
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    num_draft_tokens: int | None = None,
    serial_parallel_transition: int | None = None,
    draft_stop_threshold: float | None = None,
    mode: str = "spaf",
    proposers: str | Sequence[str] | None = None,
    tree_width: int | None = None,
    lookup_branches: int | None = None,
    max_nodes: int | None = None,
    lookup_min_match: int | None = None,
    lookup_depth: int | None = None,
    lookup_start: int | None = None,
    min_drafts: int | None = None,
) -> DecodeSettings:
    """Options left unset come from ``defaults`` (a config's or manifest's decoding keys); validated (ConfigError)."""
    if mode not in MODES:
        raise ConfigError(f"Invalid mode={mode!r}: expected one of {MODES}.")
    params = SamplingParams(
        temperature=defaults.get("temperature", 0.0) if temperature is None else temperature,
        top_k=defaults.get("top_k", 0) if top_k is None else top_k,
        top_p=defaults.get("top_p", 1.0) if top_p is None else top_p,
    )
    n = defaults.get("num_draft_tokens", 5) if num_draft_tokens is None else num_draft_tokens
    s = serial_parallel_transition
    if s is None and isinstance(n, int):
        s = min(defaults.get("serial_parallel_transition", 2), n)
    eta = defaults.get("draft_stop_threshold") if draft_stop_threshold is None else draft_stop_threshold
    validate_drafting(n, s, eta)
    tree = {}
    for name, value, least in (("tree_width", tree_width, 1), ("lookup_branches", lookup_branches, 1),
                               ("max_nodes", max_nodes, 1), ("lookup_min_match", lookup_min_match, 1),
                               ("lookup_depth", lookup_depth, 1), ("lookup_start", lookup_start, 1),
                               ("min_drafts", min_drafts, 0)):
        value = defaults.get(name, DecodeSettings.__dataclass_fields__[name].default) if value is None else value
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"Invalid {name}={value!r}: expected an integer >= {least}.")
        tree[name] = value
    names = parse_proposers(defaults.get("proposers", DecodeSettings.proposers) if proposers is None else proposers)
    return DecodeSettings(params, n, s, eta, mode, names, **tree)


def parse_proposers(value: str | Sequence[str]) -> tuple[str, ...]:
    """``"spaf+lookup"`` (or a sequence of names) -> ``("spaf", "lookup")``; ConfigError for others."""
    names = tuple(value.split("+")) if isinstance(value, str) else tuple(value)
    bad = [name for name in names if name not in PROPOSERS]
    if not names or bad or len(set(names)) != len(names):
        raise ConfigError(
            f"Invalid proposers={value!r}: expected one or more of {', '.join(PROPOSERS)} joined by '+', "
            "e.g. 'spaf+lookup'."
        )
    return names


def cut_at_eos(tokens: list[int], eos: frozenset[int]) -> tuple[list[int], bool]:
    for index, token in enumerate(tokens):
        if token in eos:
            return tokens[: index + 1], True
    return tokens, False


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
