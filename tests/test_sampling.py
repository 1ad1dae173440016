"""Sampling is exact: the acceptance rule (unit level) and SpAF sampling (distribution level).

Distribution test. Speculative sampling promises that every generated sequence has the
base model's probability. We check the JOINT law of the first two new tokens (x1, x2):
its exact value p(x1) * p(x2 | x1) comes from the base model (one batched forward over
every x1), after the same temperature / top-k / top-p processing. SpAF samples it with
one serial draft and one aligned draft per step, so a wrong acceptance or residual rule
at either draft position, or a wrong conditioning of x2, changes this law.

A chi-square goodness-of-fit test at ALPHA = 0.001 compares the counts of SAMPLES = 2000
runs (cells with an expected count < 5 pooled into one; ~60 cells). Seeds are fixed, so
the outcome is deterministic; a correct sampler fails with probability 0.001 per new
choice of seeds (measured p-values: 0.31 and 0.50 for two seed sets). Power: the same
test on deliberately wrong rules must reject them with only POWER_SAMPLES = 500 runs
(the statistic of a biased sampler grows linearly with the sample count, so 2000 runs
reject them harder). Measured: "always accept the draft" gives p ~ 1e-119 at 300 runs;
"after a rejection resample from p instead of norm(max(0, p - q))" gives p ~ 1e-6 at 300
runs and 1e-16 at 600. About 5 ms per run on an idle core: ~40 s for this module.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_tiny_spaf
from scipy.stats import chi2

import spaf_edge.core.sampling as sampling
import spaf_edge.decoding.loop as loop
import spaf_edge.generation.reference as reference
from spaf_edge.core.config import SpAFConfig
from spaf_edge.core.errors import ConfigError
from spaf_edge.core.sampling import (
    SamplingParams,
    accept,
    choose,
    logits_to_probs,
    sample,
    softmax,
    top_probability,
)

pytestmark = pytest.mark.usefixtures("single_thread")

ALPHA = 1e-3
VOCAB = 24
PROMPT = [1, 2]
SAMPLES = 2000  # ~60 cells of the 24 x 24 joint reach an expected count of 5; the rest are pooled
POWER_SAMPLES = 500


# ---- logits_to_probs ------------------------------------------------------
def test_greedy_is_one_hot_on_argmax():
    logits = np.array([[0.1, 2.0, -1.0, 2.0 - 1e-6], [3.0, 0.0, 0.0, 0.0]])
    probs = logits_to_probs(logits, SamplingParams())
    assert probs.tolist() == [[0, 1, 0, 0], [1, 0, 0, 0]]


def test_temperature_scales_logits_before_softmax():
    logits = np.random.default_rng(0).normal(size=(3, 10))
    probs = logits_to_probs(logits, SamplingParams(temperature=0.7))
    expected = np.exp(logits / 0.7) / np.exp(logits / 0.7).sum(-1, keepdims=True)
    np.testing.assert_allclose(probs, expected, rtol=1e-12)
    assert probs.dtype == np.float64


def test_top_k_keeps_the_k_largest_renormalised():
    logits = np.array([1.0, 4.0, 3.0, -2.0, 2.5, 0.0])
    probs = logits_to_probs(logits, SamplingParams(temperature=1.0, top_k=3))
    assert np.nonzero(probs)[0].tolist() == [1, 2, 4]
    kept = np.exp([4.0, 3.0, 2.5])
    np.testing.assert_allclose(probs[[1, 2, 4]], kept / kept.sum(), rtol=1e-12)


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    logits = np.log(np.array([0.15, 0.5, 0.05, 0.3]))
    probs = logits_to_probs(logits, SamplingParams(temperature=1.0, top_p=0.75))
    np.testing.assert_allclose(probs, [0, 0.5 / 0.8, 0, 0.3 / 0.8], rtol=1e-12)
    probs = logits_to_probs(logits, SamplingParams(temperature=1.0, top_p=0.81))
    np.testing.assert_allclose(probs, [0.15 / 0.95, 0.5 / 0.95, 0, 0.3 / 0.95], rtol=1e-12)
    probs = logits_to_probs(logits, SamplingParams(temperature=1.0, top_p=0.01))
    assert probs.tolist() == [0, 1, 0, 0]  # the most likely token always stays


def test_filters_agree_with_transformers_warpers():
    from transformers.generation.logits_process import (
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = np.random.default_rng(1).normal(scale=2.0, size=(8, 50))
    for temperature, top_k, top_p in [(1.0, 10, 1.0), (0.8, 0, 0.9), (1.3, 20, 0.7), (0.5, 5, 0.5)]:
        ours = logits_to_probs(logits, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p))
        warped = torch.tensor(logits / temperature)
        if top_k:
            warped = TopKLogitsWarper(top_k)(None, warped)
        if top_p < 1:
            warped = TopPLogitsWarper(top_p)(None, warped)
        np.testing.assert_allclose(ours, torch.softmax(warped, -1).numpy(), atol=1e-12)


def full_sort_top_p(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The former logits_to_probs (a full stable sort for top-p): the reference the fast one must equal."""
    logits = np.asarray(logits, dtype=np.float64)
    scaled = logits / params.temperature
    if 0 < params.top_k < scaled.shape[-1]:
        kth = np.partition(scaled, -params.top_k, axis=-1)[..., -params.top_k, None]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    probs = softmax(scaled)
    order = np.argsort(-probs, axis=-1, kind="stable")
    sorted_probs = np.take_along_axis(probs, order, axis=-1)
    before = np.cumsum(sorted_probs, axis=-1) - sorted_probs
    keep_sorted = before < params.top_p
    keep = np.zeros_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, axis=-1)
    probs = np.where(keep, probs, 0.0)
    probs /= probs.sum(axis=-1, keepdims=True)
    return probs


def random_logits(rng, rows: int, vocab: int) -> np.ndarray:
    """Peaked, flat and heavily tied rows (ties at every rank, including the top-p boundary)."""
    peaked = rng.standard_t(3, size=(rows, vocab)) * 4.0
    flat = rng.normal(scale=0.5, size=(rows, vocab))
    tied = np.round(rng.normal(scale=3.0, size=(rows, vocab)))  # ~20 distinct values
    constant = np.zeros((1, vocab))
    return np.concatenate([peaked, flat, tied, constant])


TOP_PS = [1e-12, 0.05, 0.5, 0.9, 0.95, 0.999, 1 - 1e-9, float(np.nextafter(1.0, 0.0))]


@pytest.mark.parametrize("top_k", [0, 50])
def test_fast_top_p_equals_the_full_sort_bit_for_bit(top_k):
    rng = np.random.default_rng(7)
    logits = random_logits(rng, 4, 4096)
    for top_p in TOP_PS:
        for temperature in (0.3, 1.0, 2.5):
            params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
            fast, reference = logits_to_probs(logits, params), full_sort_top_p(logits, params)
            assert np.array_equal(fast, reference), (top_p, temperature)


def test_fast_top_p_on_a_boundary_tie_keeps_the_lower_ids():
    # Five tokens tied at 0.1 straddle the top-p boundary: the stable order keeps the first ids.
    probs = np.full(4000, 0.5 / 3995)
    probs[[10, 700, 1500, 2000, 3999]] = 0.1
    params = SamplingParams(temperature=1.0, top_p=0.25)
    fast = logits_to_probs(np.log(probs), params)
    assert np.array_equal(fast, full_sort_top_p(np.log(probs), params))
    assert np.flatnonzero(fast).tolist() == [10, 700, 1500]


def test_fast_top_p_also_takes_exact_boundary_masses():
    # top_p equal to a prefix mass: the token after that prefix has mass == top_p before it, so it goes.
    rng = np.random.default_rng(3)
    logits = rng.normal(scale=2.0, size=(3, 4096))
    for row in logits:
        probs = softmax(row)
        sorted_probs = np.sort(probs)[::-1]
        for cut in (1, 7, 100):
            top_p = float(np.cumsum(sorted_probs)[cut - 1])
            params = SamplingParams(temperature=1.0, top_p=min(top_p, float(np.nextafter(1.0, 0.0))))
            assert np.array_equal(logits_to_probs(row, params), full_sort_top_p(row, params))


def test_fast_top_p_keeps_batch_shapes():
    logits = np.random.default_rng(5).normal(scale=3.0, size=(2, 3, 1000))
    params = SamplingParams(temperature=0.8, top_p=0.9)
    fast = logits_to_probs(logits, params)
    assert fast.shape == (2, 3, 1000)
    assert np.array_equal(fast, full_sort_top_p(logits, params))


def test_fast_top_p_sorts_only_a_few_candidates_on_a_peaked_row(monkeypatch):
    logits = np.random.default_rng(2).standard_t(3, size=49152) * 4.0
    params = SamplingParams(temperature=0.8, top_p=0.9)
    reference = full_sort_top_p(logits, params)
    sorted_sizes = []
    real_argsort = np.argsort

    def spy(values, *args, **kwargs):
        sorted_sizes.append(np.size(values))
        return real_argsort(values, *args, **kwargs)

    monkeypatch.setattr(sampling.np, "argsort", spy)
    fast = logits_to_probs(logits, params)
    assert np.array_equal(fast, reference)
    assert sorted_sizes and max(sorted_sizes) < 49152 // 10


def test_bad_sampling_params_are_refused():
    for kwargs in ({"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.2}, {"top_k": -3}):
        with pytest.raises(ConfigError):
            SamplingParams(**kwargs)


# ---- sample / choose -------------------------------------------------------
class ScriptedRng:
    """Stands in for np.random.Generator: ``random()`` returns the given values in order."""

    def __init__(self, values):
        self.values = list(values)

    def random(self):
        return self.values.pop(0)


def test_sample_maps_uniforms_to_cdf_intervals_and_skips_zero_mass():
    probs = np.array([0.0, 0.25, 0.0, 0.75, 0.0])
    assert sample(probs, ScriptedRng([0.0])) == 1
    assert sample(probs, ScriptedRng([0.2499])) == 1
    assert sample(probs, ScriptedRng([0.2501])) == 3
    assert sample(probs, ScriptedRng([1 - 1e-12])) == 3
    rng = np.random.default_rng(0)
    draws = np.array([sample(probs, rng) for _ in range(4000)])
    assert set(draws.tolist()) == {1, 3}
    assert abs((draws == 3).mean() - 0.75) < 0.03  # 4.4 standard deviations


def test_sample_never_returns_a_zero_probability_token():
    probs = np.array([0.5, 0.5, 0.0])
    assert sample(probs, ScriptedRng([1.0])) == 1  # u * total rounded up to total: past every interval


def test_draft_distribution_is_none_for_nan_or_inf_logits():
    params, vocab = SamplingParams(temperature=1.0), np.array([0, 2, 4])
    q = sampling.draft_distribution(np.array([0.0, 1.0, 2.0]), params, vocab, 6)
    np.testing.assert_allclose(q[vocab], softmax(np.array([0.0, 1.0, 2.0])))
    assert q[[1, 3, 5]].tolist() == [0, 0, 0]
    for bad in ([0.0, np.nan, 2.0], [0.0, np.inf, 2.0], [-np.inf] * 3):
        assert sampling.draft_distribution(np.array(bad), params, vocab, 6) is None
    assert sampling.draft_distribution(np.array([0.0, -np.inf, 2.0]), params, vocab, 6)[2] == 0  # as top-k masks
    greedy = sampling.draft_distribution(np.array([0.0, np.nan, 2.0]), SamplingParams(), vocab, 6)
    assert greedy.sum() == 1.0  # greedy never reads q: its one-hot is kept


def test_choose_is_argmax_when_greedy():
    probs = np.array([0.2, 0.5, 0.3])
    assert choose(probs, SamplingParams(), ScriptedRng([])) == 1
    assert choose(probs, SamplingParams(temperature=1.0), ScriptedRng([0.1])) == 0


# ---- accept -----------------------------------------------------------------
def one_hot(index, size=6):
    vector = np.zeros(size)
    vector[index] = 1.0
    return vector


def test_greedy_accept_stops_at_first_mismatch():
    params = SamplingParams()
    target = np.stack([one_hot(i) for i in (2, 4, 1, 5)])  # argmaxes of p_T .. p_{T+3}
    drafts = [2, 4, 0]
    probs = [one_hot(d) for d in drafts]
    assert accept(drafts, probs, target, params, ScriptedRng([])) == (2, 1)
    assert accept([2, 4, 1], [one_hot(d) for d in (2, 4, 1)], target, params, ScriptedRng([])) == (3, 5)
    assert accept([3], [one_hot(3)], target[:2], params, ScriptedRng([])) == (0, 2)
    assert accept([], [], target[:1], params, ScriptedRng([])) == (0, 2)


def uniform_pieces(p, q, p_next):
    """Intervals of [0, 1) on which every decision ``accept`` can make with one uniform is constant.

    Boundaries: each acceptance ratio p/q, and the CDF steps of the residual and of p_next.
    Returns (midpoints, lengths).
    """
    points = [0.0, 1.0]
    with np.errstate(divide="ignore", invalid="ignore"):
        points.extend(np.minimum(p / q, 1.0)[q > 0].tolist())
    for dist in (np.maximum(p - q, 0.0), p_next):
        cdf = np.cumsum(dist)
        if cdf[-1] > 0:
            points.extend((cdf / cdf[-1]).tolist())
    points = np.unique(np.clip(points, 0.0, 1.0))
    return (points[:-1] + points[1:]) / 2, np.diff(points)


def exact_accept_law(p, q, p_next):
    """Run ``accept`` on one draft for every piece of (u1, u2) and weight the outcomes exactly.

    One accept call with one draft uses at most two uniforms (acceptance test, then residual
    or bonus sample); an unused one only sums its piece lengths to 1. Returns (law of the
    first committed token, law of the bonus jointly with acceptance).
    """
    params = SamplingParams(temperature=1.0)
    middles, lengths = uniform_pieces(p, q, p_next)
    first = np.zeros_like(p)
    bonus_after_accept = np.zeros_like(p)
    for draft in np.nonzero(q)[0]:
        for u1, w1 in zip(middles, lengths):
            for u2, w2 in zip(middles, lengths):
                weight = q[draft] * w1 * w2
                accepted, bonus = accept([int(draft)], [q], np.stack([p, p_next]), params, ScriptedRng([u1, u2]))
                first[draft if accepted else bonus] += weight
                if accepted:
                    bonus_after_accept[bonus] += weight
    return first, bonus_after_accept


@pytest.mark.parametrize("case", range(4))
def test_one_accept_call_yields_exactly_p(case):
    rng = np.random.default_rng(case)
    size = 7
    p, q, p_next = (softmax(rng.normal(scale=1.5, size=size)) for _ in range(3))
    if case == 1:
        q[[0, 3]] = 0.0  # drafts never propose some tokens (e.g. a draft vocabulary)
        q /= q.sum()
    if case == 2:
        p[[1, 5]] = 0.0  # target filtered by top-k / top-p
        p /= p.sum()
    if case == 3:
        q = p.copy()  # identical drafter: always accepted
    first, bonus = exact_accept_law(p, q, p_next)
    np.testing.assert_allclose(first, p, atol=1e-12)
    np.testing.assert_allclose(bonus, np.minimum(p, q).sum() * p_next, atol=1e-12)


def garbage_draft_distributions(p):
    """Draft distributions no sampler could have drawn from, each with a draft token to try."""
    size = len(p)
    nan = np.full(size, np.nan)
    vocab_nan = np.zeros(size)
    vocab_nan[::2] = np.nan  # a draft vocabulary's softmax of NaN logits, scattered to the full vocabulary
    half = p / 2  # unnormalised: q[d] <= p[d] would accept every draft
    negative = p.copy()
    negative[[0, 1]] += [0.7, -0.7]  # sums to 1 with q(1) < 0
    infinite = np.zeros(size)
    infinite[2] = np.inf
    zero_at_draft = softmax(np.arange(size, dtype=float))
    zero_at_draft[3] = 0.0
    zero_at_draft /= zero_at_draft.sum()
    return {"nan": (nan, 0), "nan in the draft vocabulary": (vocab_nan, size - 1), "unnormalised": (half, 1),
            "negative": (negative, 0), "inf": (infinite, 2), "q(draft) = 0": (zero_at_draft, 3)}


def test_a_draft_without_a_valid_q_is_rejected_and_the_bonus_comes_from_p():
    params = SamplingParams(temperature=1.0)
    p = np.array([0.05, 0.6, 0.1, 0.05, 0.1, 0.1])
    p_next = softmax(np.arange(6, dtype=float))
    target = np.stack([p, p_next])
    for name, (q, draft) in garbage_draft_distributions(p).items():
        for u in (0.0, 0.3, 0.99):
            expected = sample(p, ScriptedRng([u]))
            assert accept([draft], [q], target, params, ScriptedRng([u])) == (0, expected), name
    # after an accepted valid draft (q(1) <= p(1): no uniform used), an invalid one stops acceptance there
    valid, (nan, _) = softmax(np.zeros(6)), garbage_draft_distributions(p)["nan"]
    assert accept([1, 4], [valid, nan], np.stack([p, p_next, p]), params, ScriptedRng([0.95])) == (
        1, sample(p_next, ScriptedRng([0.95])))


@pytest.mark.parametrize("name", ["nan", "nan in the draft vocabulary", "unnormalised", "negative", "inf"])
def test_committed_tokens_follow_p_whatever_the_garbage_q(name):
    """Drafts drawn any way at all (here uniformly) with a q that is no distribution: the first
    committed token still follows p."""
    params = SamplingParams(temperature=1.0)
    rng = np.random.default_rng(3)
    p, p_next = softmax(rng.normal(scale=1.5, size=7)), softmax(rng.normal(size=7))
    q, _ = garbage_draft_distributions(p)[name]
    counts = np.zeros(7, dtype=np.int64)
    for draft in rng.integers(0, 7, size=SAMPLES):
        accepted, bonus = accept([int(draft)], [q], np.stack([p, p_next]), params, rng)
        counts[draft if accepted else bonus] += 1
    assert chi_square_p_value(counts, p) > ALPHA


# ---- the whole sampler against the base distribution ------------------------
@pytest.fixture(scope="module")
def sampling_model():
    """A tiny SpAF model with a 24-token vocabulary and peaked, draft-disagreeing distributions."""
    return make_tiny_spaf(
        "llama", seed=11, vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        initializer_range=0.5, spaf_config=SpAFConfig(cutoff_layer=1),
    )


def exact_joint(model, params: SamplingParams) -> np.ndarray:
    """p(x1, x2) of the base model after ``params``' processing: [V, V]."""
    with torch.no_grad():
        rows = torch.tensor([PROMPT + [x1] for x1 in range(VOCAB)])  # [V, P+1]
        logits = model.base(rows).logits.double().numpy()  # [V, P+1, V]
    first = logits_to_probs(logits[0, -2], params)  # p(x1 | prompt)
    second = logits_to_probs(logits[:, -1], params)  # p(x2 | prompt, x1)
    return first[:, None] * second


def sampled_joint(model, params: SamplingParams, samples: int, seed: int, proposers: str = "spaf+lookup"
                  ) -> np.ndarray:
    counts = np.zeros((VOCAB, VOCAB), dtype=np.int64)
    for index in range(samples):
        result = reference.spaf_generate(
            model, PROMPT, max_new_tokens=3, temperature=params.temperature, top_k=params.top_k,
            top_p=params.top_p, seed=seed + index, num_draft_tokens=2, serial_parallel_transition=1,
            eos_token_ids=[], proposers=proposers,
        )
        counts[result.tokens[0], result.tokens[1]] += 1
    return counts


def chi_square_p_value(counts: np.ndarray, probs: np.ndarray) -> float:
    """Goodness of fit; cells with expected count < 5 are pooled; impossible outcomes give 0."""
    counts, probs = counts.ravel(), probs.ravel()
    if counts[probs == 0].sum():
        return 0.0
    expected = counts.sum() * probs
    small = (expected < 5) & (probs > 0)
    observed, expected = counts[expected >= 5], expected[expected >= 5]
    if small.any():
        observed = np.append(observed, counts[small].sum())
        expected = np.append(expected, (counts.sum() * probs)[small].sum())
    statistic = ((observed - expected) ** 2 / expected).sum()
    return float(chi2.sf(statistic, df=len(expected) - 1))


def test_chi_square_check_accepts_exact_draws_and_rejects_biased_ones():
    probs = softmax(np.random.default_rng(0).normal(scale=1.5, size=40))
    rng = np.random.default_rng(1)
    assert chi_square_p_value(rng.multinomial(SAMPLES, probs), probs) > ALPHA
    biased = 0.9 * probs + 0.1 * softmax(np.zeros(40))
    assert chi_square_p_value(rng.multinomial(SAMPLES, biased), probs) < ALPHA


@pytest.mark.parametrize(
    "params,draft_vocab",
    [
        (SamplingParams(temperature=1.0), None),
        (SamplingParams(temperature=0.8, top_k=10, top_p=0.9), None),
        (SamplingParams(temperature=1.0), list(range(0, VOCAB, 2))),
    ],
    ids=["temperature", "top-k+top-p", "draft-vocab"],
)
def test_spaf_sampling_matches_base_distribution(sampling_model, params, draft_vocab):
    sampling_model.set_draft_vocab(None if draft_vocab is None else torch.tensor(draft_vocab))
    try:
        counts = sampled_joint(sampling_model, params, SAMPLES, seed=1000)
    finally:
        sampling_model.set_draft_vocab(None)
    p_value = chi_square_p_value(counts, exact_joint(sampling_model, params))
    assert p_value > ALPHA, f"SpAF samples do not follow the base distribution (p={p_value:.2e})"


def test_nan_drafter_weights_keep_sampling_exact(sampling_model):
    """NaN AlignmentHead weights: every aligned draft has NaN logits; with a draft vocabulary
    the old sampler drew a token outside it (q = 0) and accepted it every time."""
    model = make_tiny_spaf(
        "llama", seed=11, vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        initializer_range=0.5, spaf_config=SpAFConfig(cutoff_layer=1),
    )
    with torch.no_grad():
        for param in model.alignment_heads.parameters():
            param.fill_(float("nan"))
    model.set_draft_vocab(torch.tensor(list(range(0, VOCAB, 2))))
    params = SamplingParams(temperature=1.0)
    counts = sampled_joint(model, params, SAMPLES, seed=1000)
    p_value = chi_square_p_value(counts, exact_joint(sampling_model, params))
    assert p_value > ALPHA, f"SpAF samples do not follow the base distribution (p={p_value:.2e})"


def always_accept(drafts, draft_probs, target_probs, params, rng):
    return len(drafts), choose(target_probs[len(drafts)], params, rng)


def resample_from_target(drafts, draft_probs, target_probs, params, rng):
    for j, token in enumerate(drafts):
        p, q = target_probs[j], draft_probs[j]
        if rng.random() * q[token] >= p[token]:
            return j, sample(p, rng)  # wrong: ignores the mass the draft already accounted for
    return len(drafts), choose(target_probs[len(drafts)], params, rng)


def on_chains(rule):
    """A chain acceptance rule as the loop's tree rule (SpAF proposes chains here)."""
    def tree_rule(tree, target_probs, params, rng):
        assert tree.is_chain
        nodes = range(1, len(tree))
        accepted, bonus = rule([tree.token(n) for n in nodes], [tree.q(n) for n in nodes], target_probs, params, rng)
        return list(range(1, accepted + 1)), bonus
    return tree_rule


@pytest.mark.parametrize("wrong_rule", [always_accept, resample_from_target], ids=lambda rule: rule.__name__)
def test_chi_square_rejects_a_wrong_acceptance_rule(sampling_model, monkeypatch, wrong_rule):
    params = SamplingParams(temperature=1.0)
    monkeypatch.setattr(loop, "accept_tree", on_chains(wrong_rule))
    counts = sampled_joint(sampling_model, params, POWER_SAMPLES, seed=1000, proposers="spaf")
    assert chi_square_p_value(counts, exact_joint(sampling_model, params)) < ALPHA


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_top_probability_is_the_softmax_maximum(dtype):
    """The greedy stop-threshold check reads softmax(l).max() without normalising the row."""
    rng = np.random.default_rng(3)
    for scale in (0.1, 3.0, 40.0):  # flat, typical and peaked rows (no overflow: max subtracted first)
        logits = (rng.standard_normal(4096) * scale).astype(dtype)
        assert top_probability(logits) == pytest.approx(softmax(logits).max(), rel=1e-5)
