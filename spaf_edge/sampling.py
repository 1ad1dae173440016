"""Token choice and the acceptance rule (DESIGN §4, step 5), in numpy.

One implementation serves the PyTorch reference and the ONNX Runtime engine, so the
two cannot drift apart. Probabilities are computed in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spaf_edge.config import validate_sampling


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
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_probs = np.take_along_axis(probs, order, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        before = np.cumsum(sorted_probs, axis=-1) - sorted_probs
        keep_sorted = before < params.top_p
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum(axis=-1, keepdims=True)
    return probs


def sample(probs: np.ndarray, rng: np.random.Generator) -> int:
    """Draw one token id from a 1-D distribution."""
    cdf = np.cumsum(probs)
    index = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    return min(index, len(probs) - 1)


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
    """
    for j, token in enumerate(drafts):
        p = target_probs[j]
        if params.greedy:
            if token == int(np.argmax(p)):
                continue
            return j, int(np.argmax(p))
        q = draft_probs[j]
        # q >= p: accept with probability p/q; q < p: always accept.
        if q[token] <= p[token] or rng.random() * q[token] < p[token]:
            continue
        residual = np.maximum(p - q, 0.0)
        total = residual.sum()
        return j, sample(residual / total if total > 0 else p, rng)
    return len(drafts), choose(target_probs[len(drafts)], params, rng)
