"""Token choice and the acceptance rule (DESIGN §4, step 5), in numpy.

One implementation serves the PyTorch reference and the ONNX Runtime engine, so the
two cannot drift apart. Probabilities are computed in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spaf_edge.core.config import validate_sampling


@dataclass(frozen=True)
class SamplingParams:
    """``temperature == 0`` means greedy; ``top_k == 0`` and ``top_p == 1`` disable filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        validate_sampling(self.temperature, self.top_p, self.top_k)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(axis=-1, keepdims=True)
    return x


def top_probability(logits: np.ndarray) -> float:
    """``softmax(logits).max()`` of one row [V] without the normalised array: ``1 / sum(exp(l - max l))``."""
    return 1.0 / float(np.exp(logits - logits.max()).sum())


TOP_P_STEPS = 24  # thresholds max(p) / 4**i tried before top-p sorts the whole vocabulary


def top_p_mask(probs: np.ndarray, top_p: float) -> np.ndarray:
    """The tokens top-p keeps: the smallest prefix of the probabilities sorted high to low
    (ties by token id, a stable sort) whose mass reaches ``top_p``; the first token always
    stays. probs: [V] -> bool [V]

    Sorts only the candidates: the tokens with probability >= a threshold, lowered x4 until
    their mass reaches ``top_p``. A value threshold takes every tie with the last candidate,
    so the candidates are exactly a prefix of the full stable order and their cumulative
    sums, hence the kept set, are bit-identical to a full sort's.
    """
    threshold = probs.max()
    for _ in range(TOP_P_STEPS):
        candidates = np.flatnonzero(probs >= threshold)  # ascending ids: stable-sort ties stay in id order
        if probs[candidates].sum() >= top_p - 1e-6:  # cheap pre-check; the exact test is on the sorted sums
            order = candidates[np.argsort(-probs[candidates], kind="stable")]
            mass = np.cumsum(probs[order])
            if mass[-1] >= top_p:  # every later token has mass >= top_p ranked before it: all dropped
                return prefix_mask(order, mass, probs, top_p)
            break  # rounding at the boundary: the full sort settles it
        threshold /= 4
    order = np.argsort(-probs, kind="stable")
    return prefix_mask(order, np.cumsum(probs[order]), probs, top_p)


def prefix_mask(order: np.ndarray, mass: np.ndarray, probs: np.ndarray, top_p: float) -> np.ndarray:
    """Keep the ranked tokens ``order`` (cumulative mass ``mass``) whose preceding mass is below ``top_p``."""
    before = mass - probs[order]
    keep = np.zeros(probs.shape, dtype=bool)
    keep[order[before < top_p]] = True
    return keep


def logits_to_probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Temperature, then top-k, then top-p, then softmax. [..., V] -> float64 [..., V]

    Greedy maps to a one-hot on the argmax, so the acceptance rule below reduces to
    "accept while the draft equals the target's argmax".
    """
    logits = np.asarray(logits, dtype=np.float64)
    if params.greedy:
        probs = np.zeros_like(logits)
        np.put_along_axis(probs, logits.argmax(axis=-1)[..., None], 1.0, axis=-1)
        return probs
    scaled = logits / params.temperature
    if 0 < params.top_k < scaled.shape[-1]:
        kth = np.partition(scaled, -params.top_k, axis=-1)[..., -params.top_k, None]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    probs = softmax(scaled)
    if params.top_p < 1.0:
        rows = probs.reshape(-1, probs.shape[-1])  # [R, V]
        keep = np.stack([top_p_mask(row, params.top_p) for row in rows]).reshape(probs.shape)
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum(axis=-1, keepdims=True)
    return probs


DISTRIBUTION_TOLERANCE = 1e-6  # |sum(q) - 1| allowed for a draft distribution


def is_distribution(probs: np.ndarray) -> bool:
    """Whether ``probs`` is a probability distribution: finite, non-negative, summing to 1.

    A NaN fails ``min >= 0``, an inf fails the sum: two passes over the vocabulary.
    """
    return bool(probs.min() >= 0.0) and abs(float(probs.sum()) - 1.0) <= DISTRIBUTION_TOLERANCE


def draft_distribution(
    logits: np.ndarray, params: SamplingParams, draft_vocab: np.ndarray | None, vocab_size: int
) -> np.ndarray | None:
    """Processed draft distribution ``q`` over the full vocabulary from draft-vocabulary logits [V_d].

    None when the logits give no distribution (NaN or inf from broken drafter weights): no
    token can be drawn from it, so drafting stops there. Greedy needs no check: its one-hot
    on the argmax is always a distribution, and greedy acceptance never reads ``q``.
    """
    with np.errstate(invalid="ignore"):
        probs = logits_to_probs(logits, params)
    if not params.greedy and not np.isfinite(probs.sum()):  # softmax turns any NaN or inf into NaNs
        return None
    if draft_vocab is None:
        return probs
    full = np.zeros(vocab_size, dtype=np.float64)
    full[draft_vocab] = probs
    return full


def sample(probs: np.ndarray, rng: np.random.Generator) -> int:
    """Draw one token id from a 1-D distribution; never a token of probability 0 if it has others.

    One uniform per call. ``u * total`` can round up to ``total``, past every interval: the
    last token with probability above 0 takes it (the last token when none has any).
    """
    cdf = np.cumsum(probs)
    index = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    if index < len(probs):
        return index
    positive = np.flatnonzero(probs > 0)
    return int(positive[-1]) if positive.size else len(probs) - 1


def choose(probs: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """The draft or target token for one position: argmax when greedy, else a sample."""
    return int(np.argmax(probs)) if params.greedy else sample(probs, rng)


def accept(
    drafts: list[int],
    draft_probs: list[np.ndarray],
    target_probs: np.ndarray,
    params: SamplingParams,
    rng: np.random.Generator,
) -> tuple[int, int]:
    """Speculative acceptance. Returns ``(n_accepted, bonus_token)``.

    drafts: D tokens; draft_probs: D distributions ``q`` over the full vocabulary, each
    the exact one its draft was drawn from; target_probs: [D+1, V] processed target
    distributions ``p_T .. p_{T+D}``.

    Exact for any ``q`` a drafter hands in: a ``q`` that is no distribution (NaN, inf,
    negative, not summing to 1), or that gives its own draft probability 0 (so the draft
    was not drawn from it), says nothing about how the draft was drawn. The draft is then
    rejected without a test and the token sampled from ``p`` itself, which is exactly ``p``.
    A valid ``q`` uses the same uniforms as ever.
    """
    for j, token in enumerate(drafts):
        p = target_probs[j]
        if params.greedy:
            if token == int(np.argmax(p)):
                continue
            return j, int(np.argmax(p))
        q = draft_probs[j]
        if not (q[token] > 0 and is_distribution(q)):
            return j, sample(p, rng)
        # q >= p: accept with probability p/q; q < p: always accept.
        if q[token] <= p[token] or rng.random() * q[token] < p[token]:
            continue
        residual = np.maximum(p - q, 0.0)
        total = residual.sum()
        return j, sample(residual / total if total > 0 else p, rng)
    return len(drafts), choose(target_probs[len(drafts)], params, rng)
