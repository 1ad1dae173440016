"""Prompt-lookup proposals: exact candidates on hand-made histories, incremental == rebuilt,
the trie that merges them, and how far a lookup chain may copy."""

from __future__ import annotations

import random
import subprocess
import sys

import numpy as np
import pytest

from spaf_edge.core.errors import ConfigError
from spaf_edge.core.sampling import SamplingParams
from spaf_edge.decoding.lookup import NgramIndex, candidates_to_trie
from spaf_edge.decoding.loop import DecodeSettings
from spaf_edge.decoding.proposers import LookupProposer


def index_of(tokens, **settings) -> NgramIndex:
    index = NgramIndex(**settings)
    index.reset(tokens)
    return index


def test_longest_match_wins_over_a_more_recent_shorter_one():
    # [1 2 3] occurred at 0..2 (followed by 9 7 2); [2 3] alone more recently at 5..6 (followed by 8 5 1).
    history = [1, 2, 3, 9, 7, 2, 3, 8, 5, 1, 2, 3]
    index = index_of(history)
    assert index.candidates(max_tokens=3, max_branches=1) == [[9, 7, 2]]
    assert index.candidates(max_tokens=3, max_branches=2) == [[9, 7, 2], [8, 5, 1]]


def test_matches_of_one_length_come_most_recent_first():
    index = index_of([5, 1, 6, 5, 2, 6, 5])
    assert index.candidates(max_tokens=3, max_branches=4) == [[2, 6, 5], [1, 6, 5]]


def test_equal_continuations_are_one_branch():
    # Both earlier 4s are followed by 5 6 4: one branch, not two.
    assert index_of([4, 5, 6, 4, 5, 6, 4]).candidates(max_tokens=3, max_branches=4) == [[5, 6, 4]]


def test_a_branch_that_is_a_prefix_grows_in_place():
    # With unigrams only: the 5 at 4 is followed by just [6 5] (the history ends); the 5 at 0 by [6 5 9 5],
    # which extends it, so the first branch becomes the longer one and keeps its place.
    index = index_of([5, 6, 5, 9, 5, 6, 5], max_ngram=1)
    assert index.candidates(max_tokens=4, max_branches=4) == [[6, 5, 9, 5], [9, 5, 6, 5]]


def test_max_tokens_cuts_every_branch_and_max_branches_caps_their_number():
    history = list(range(10, 40)) + [7, 1, 2, 3, 4, 5, 8, 1, 9, 9, 9, 9, 11, 1]
    index = index_of(history)
    assert index.candidates(max_tokens=2, max_branches=8) == [[9, 9], [2, 3]]
    assert index.candidates(max_tokens=5, max_branches=1) == [[9, 9, 9, 9, 11]]


def test_no_earlier_occurrence_gives_no_candidates():
    assert index_of([1, 2, 3, 4, 5]).candidates(4, 3) == []
    assert index_of([]).candidates(4, 3) == []
    assert index_of([3]).candidates(4, 3) == []
    assert index_of([3, 3]).candidates(0, 3) == []
    assert index_of([3, 3]).candidates(4, 0) == []


def test_min_ngram_ignores_shorter_matches():
    history = [1, 2, 8, 3, 2]  # only the unigram [2] occurred before
    assert index_of(history).candidates(2, 2) == [[8, 3]]
    assert index_of(history, min_ngram=2).candidates(2, 2) == []


def test_max_scan_bounds_the_positions_visited():
    # Many earlier 0s, all followed by 0 0 ..; the one distinct continuation lies beyond the scan limit.
    history = [0, 5] + [0] * 40
    assert index_of(history, max_ngram=1, max_scan=8).candidates(2, 2) == [[0, 0]]
    assert index_of(history, max_ngram=1, max_scan=64).candidates(2, 2) == [[0, 0], [5, 0]]


def test_numpy_input_and_plain_int_output():
    index = NgramIndex()
    index.reset(np.array([3, 4, 3], dtype=np.int32))
    index.extend(np.array([4], dtype=np.int64))
    branches = index.candidates(2, 1)
    assert branches == [[3, 4]] and all(type(token) is int for token in branches[0])
    assert len(index) == 4 and index.tokens == [3, 4, 3, 4]


def test_reset_forgets_the_previous_history():
    index = index_of([1, 2, 1])
    assert index.candidates(1, 1) == [[2]]
    index.reset([7, 1])
    assert index.candidates(1, 1) == []


def reference_candidates(history, max_tokens, max_branches, min_ngram, max_ngram, max_scan):
    """The rule written as a rescan of the whole history."""
    branches = []
    last = len(history) - 1
    for n in range(min(max_ngram, last + 1), min_ngram - 1, -1):
        suffix = history[last - n + 1 :]
        ends = [end for end in range(last - 1, n - 2, -1) if history[end - n + 1 : end + 1] == suffix][:max_scan]
        for end in ends:
            found = history[end + 1 : end + 1 + max_tokens]
            for i, branch in enumerate(branches):
                if branch[: len(found)] == found[: len(branch)]:
                    branches[i] = max(branch, found, key=len)
                    break
            else:
                branches.append(found)
            if len(branches) == max_branches:
                return branches
    return branches


@pytest.mark.parametrize("seed", range(6))
def test_incremental_index_equals_a_rebuilt_one_and_the_rescan(seed):
    rng = random.Random(seed)
    settings = dict(min_ngram=rng.randint(1, 2), max_ngram=rng.randint(2, 5), max_scan=rng.choice([2, 5, 32]))
    vocab = rng.choice([3, 6, 20])
    history = [rng.randrange(vocab) for _ in range(rng.randint(0, 12))]
    index = index_of(history, **settings)
    for _ in range(40):
        chunk = [rng.randrange(vocab) for _ in range(rng.randint(1, 4))]
        index.extend(chunk)
        history += chunk
        rebuilt = index_of(history, **settings)
        for max_tokens, max_branches in ((1, 1), (3, 2), (6, 4)):
            got = index.candidates(max_tokens, max_branches)
            assert got == rebuilt.candidates(max_tokens, max_branches)
            assert got == reference_candidates(history, max_tokens, max_branches, **settings)
    assert index.tokens == history


@pytest.mark.parametrize("settings", [
    dict(min_ngram=0), dict(min_ngram=3, max_ngram=2), dict(max_ngram=2.5), dict(max_scan=0),
])
def test_bad_settings_are_config_errors(settings):
    with pytest.raises(ConfigError, match="lookup"):
        NgramIndex(**settings)


def test_negative_limits_are_config_errors():
    with pytest.raises(ConfigError, match="max_tokens=-1"):
        index_of([1, 1]).candidates(-1, 2)


def test_trie_merges_shared_prefixes_breadth_first():
    tokens, parents = candidates_to_trie([[5, 6, 7], [5, 8], [9], [5, 6]])
    # node:     1  2  3  4  5
    assert tokens == [5, 9, 6, 8, 7]
    assert parents == [0, 0, 1, 1, 3]


def test_trie_paths_are_the_candidates():
    rng = random.Random(3)
    chains = [[rng.randrange(4) for _ in range(rng.randint(1, 5))] for _ in range(12)]
    tokens, parents = candidates_to_trie(chains)
    paths = {0: ()}
    depth = {0: 0}
    for node, (token, parent) in enumerate(zip(tokens, parents), start=1):
        assert 0 <= parent < node
        paths[node] = paths[parent] + (token,)
        depth[node] = depth[parent] + 1
        assert depth[node] >= depth[node - 1]  # breadth-first
    assert len(set(paths.values())) == len(paths)  # a token appears once under a parent
    prefixes = {tuple(chain[:k]) for chain in chains for k in range(len(chain) + 1)}
    assert set(paths.values()) == prefixes


def test_empty_trie():
    assert candidates_to_trie([]) == ([], [])


def test_lookup_imports_no_torch():
    code = ("import sys, spaf_edge.decoding.lookup\n"
            "print(sorted(m for m in ('torch', 'onnxruntime') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def copy_limits(steps, start=4, depth=16):
    """The limits a LookupProposer gives over ``steps`` of (tokens proposed by lookup, drafts accepted)."""
    settings = DecodeSettings(SamplingParams(temperature=0.0), 4, 0, None, "spaf", lookup_start=start,
                              lookup_depth=depth)
    proposer = LookupProposer(lambda: [1, 2, 3])
    proposer.start()
    limits = []
    for proposed, accepted in steps:
        limits.append(proposer.limit(settings))
        proposer.proposing(proposed)
        proposer.accepted(accepted)
    limits.append(proposer.limit(settings))
    return limits


def test_lookup_copies_double_while_accepted_whole_and_reset_otherwise():
    # whole, whole, whole (capped), partial, a SpAF chain accepted whole, a short branch accepted whole
    steps = [(4, 4), (8, 8), (16, 16), (16, 3), (0, 5), (2, 2)]
    assert copy_limits(steps) == [4, 8, 16, 16, 4, 4, 8]
    assert copy_limits([(4, 3)]) == [4, 4]  # one short of whole: no growth
    assert copy_limits([(4, 4), (8, 8)], start=6, depth=4) == [4, 4, 4]  # start above depth: the depth caps it
    assert copy_limits([(3, 3)], start=3, depth=5) == [3, 5]


def test_a_new_generation_starts_short():
    settings = DecodeSettings(SamplingParams(temperature=0.0), 4, 0, None, "spaf")
    proposer = LookupProposer(lambda: [1, 2, 3])
    proposer.proposing(4)
    proposer.accepted(4)
    assert proposer.limit(settings) == 8
    proposer.start()
    assert proposer.limit(settings) == settings.lookup_start == 4
