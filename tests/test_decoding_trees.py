"""Draft trees through the one loop on the PyTorch reference: runner-up leaves and lookup branches
stay lossless, and a tree's accepted path lands in the caches as a chain's would."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_tiny_spaf

import spaf_edge.decoding.loop as loop
from spaf_edge.core.config import SpAFConfig
from spaf_edge.core.errors import ConfigError
from spaf_edge.core.sampling import SamplingParams, logits_to_probs
from spaf_edge.decoding.loop import DecodeSettings, parse_proposers
from spaf_edge.decoding.spaf import SpAFProposer
from spaf_edge.decoding.tree import accept_tree
from spaf_edge.generation.reference import TorchBackend, spaf_generate

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS = ([1, 7, 19, 42, 5, 1, 7, 19], [3, 90, 11], [9])


def hf_greedy(base, prompt: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = base.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                            eos_token_id=None, pad_token_id=0,
                            attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


def first_path(tree) -> int:
    """Nodes 0 .. k-1 that form the tree's first path (each the child of the one before)."""
    parents = tree.parents
    k = 1
    while k < len(parents) and parents[k] == k - 1:
        k += 1
    return k


def record_trees(monkeypatch) -> list[tuple[object, list[int]]]:
    """(tree, accepted path) of every verify step of the loop."""
    steps = []

    def recording(tree, target_probs, params, rng):
        path, bonus = accept_tree(tree, target_probs, params, rng)
        steps.append((tree, path))
        return path, bonus

    monkeypatch.setattr(loop, "accept_tree", recording)
    return steps


OFF_CHAIN: list[int] = []  # per configuration of the test below: steps that accepted a node off the first path


@pytest.mark.parametrize("kind", ["fused", "attention"])
@pytest.mark.parametrize("num_drafts,transition", [(4, 1), (5, 0), (3, 3)])
def test_tree_greedy_equals_hf_generate(kind, num_drafts, transition, monkeypatch):
    """Runner-up leaves and lookup branches: the tokens are the base's (and tree nodes off the
    SpAF chain were accepted: see the next test)."""
    model = make_tiny_spaf("llama", 0, spaf_config=SpAFConfig(cutoff_layer=2, adapter_kind=kind,
                                                              adapter_dim_ratio=1.0))
    steps = record_trees(monkeypatch)
    for prompt in PROMPTS:
        result = spaf_generate(model, prompt, max_new_tokens=40, temperature=0.0, eos_token_ids=[],
                               num_draft_tokens=num_drafts, serial_parallel_transition=transition,
                               proposers="spaf+lookup", tree_width=3, max_nodes=12, trees=True)
        assert result.tokens == hf_greedy(model.base, prompt, 40)
        assert result.stats.candidates > sum(result.stats.drafted)  # more nodes than the chains had
    assert all(len(tree) - 1 <= 12 for tree, _ in steps)
    OFF_CHAIN.append(sum(any(node >= first_path(tree) for node in path) for tree, path in steps))


def test_trees_accepted_nodes_off_the_first_path():
    """Across the configurations above, verify passes accepted runner-up or lookup nodes."""
    if len(OFF_CHAIN) < 6:
        pytest.skip("runs after test_tree_greedy_equals_hf_generate, in the same session")
    assert sum(OFF_CHAIN) > 0 and sum(count > 0 for count in OFF_CHAIN) >= 3, OFF_CHAIN


def test_lookup_alone_is_lossless_and_speculates():
    model = make_tiny_spaf("llama", 1)
    prompt = [5, 6, 7, 8, 9, 10, 5, 6, 7]
    result = spaf_generate(model, prompt, max_new_tokens=48, temperature=0.0, eos_token_ids=[], proposers="lookup")
    assert result.tokens == hf_greedy(model.base, prompt, 48)
    assert sum(result.stats.accepted) > 0 and result.stats.tau > 1.0  # a random tiny model repeats itself


def test_lookup_chains_grow_while_accepted_whole(monkeypatch):
    """A lookup chain copies at most lookup_start tokens, twice as many after a step that accepted its
    whole lookup chain (up to lookup_depth), lookup_start again after any other; tokens stay the base's."""
    model = make_tiny_spaf("llama", 1)
    steps = record_trees(monkeypatch)
    prompt = [5, 6, 7, 8, 9, 10, 5, 6, 7]
    result = spaf_generate(model, prompt, max_new_tokens=96, temperature=0.0, eos_token_ids=[], proposers="lookup",
                           lookup_start=2, lookup_depth=8)
    assert result.tokens == hf_greedy(model.base, prompt, 96)
    limit, lengths = 2, []
    for tree, path in steps:
        proposed = len(tree) - 1
        assert proposed <= limit
        lengths.append(proposed)
        limit = min(8, 2 * limit) if proposed and len(path) >= proposed else 2
    assert max(lengths) == 8  # a random tiny model repeats itself: copies grew to the depth


@pytest.mark.parametrize("min_match", [1, 3])
def test_chains_take_a_long_enough_lookup_match_else_spaf(min_match, monkeypatch):
    """Without trees, spaf+lookup proposes one chain per step: the lookup branch when its match has
    at least lookup_min_match tokens, else SpAF's; the tokens stay the base's."""
    model = make_tiny_spaf("llama", 1, spaf_config=SpAFConfig(cutoff_layer=2, adapter_dim_ratio=1.0))
    steps = record_trees(monkeypatch)
    spaf_trees = set()
    spaf_propose = SpAFProposer.propose

    def recording(self, *args):
        proposal = spaf_propose(self, *args)
        spaf_trees.add(id(proposal.tree))
        return proposal

    monkeypatch.setattr(SpAFProposer, "propose", recording)
    prompt = [5, 6, 7, 8, 9, 10, 5, 6, 7]
    result = spaf_generate(model, prompt, max_new_tokens=40, temperature=0.0, eos_token_ids=[],
                           proposers="spaf+lookup", lookup_min_match=min_match, tree_width=3)  # ignored: chains
    assert result.tokens == hf_greedy(model.base, prompt, 40)
    assert all(tree.is_chain for tree, _ in steps)
    kinds = {id(tree) in spaf_trees for tree, _ in steps if len(tree) > 1}
    assert kinds == {True, False}  # both proposers drafted some chains


@torch.no_grad()
def test_tree_commit_leaves_the_caches_of_a_fresh_prefill():
    """After each tree step the caches' valid rows equal those a fresh prefill of the tokens writes."""
    model = make_tiny_spaf("llama", 2, spaf_config=SpAFConfig(cutoff_layer=2, adapter_dim_ratio=1.0))
    params = SamplingParams(temperature=0.0)
    settings = DecodeSettings(params, 4, 1, None, "spaf", ("spaf", "lookup"), tree_width=3, max_nodes=10)
    assert settings.lookup_min_match == 2
    backend = TorchBackend(model, 96, frozenset(), trees=True)
    backend.prefill(PROMPTS[0], reuse_cache=False, active=True)
    trees = 0
    for _ in range(8):
        proposal = backend.proposer.propose(4, settings, np.random.default_rng(0))
        trees += not proposal.tree.is_chain
        path, bonus = accept_tree(proposal.tree, logits_to_probs(backend.verify(proposal), params), params, None)
        backend.proposer.accepted(proposal, [0, *path])
        backend.commit(proposal, [0, *path], bonus)
        fresh = TorchBackend(model, 96, frozenset())
        fresh.prefill(backend.tokens, reuse_cache=False, active=False)
        length = backend.position
        assert backend.lower.length == backend.upper.length == length
        for ours, theirs in ((backend.lower, fresh.lower), (backend.upper, fresh.upper)):
            for layer in ours.layer_ids:
                for a, b in ((ours.keys[layer], theirs.keys[layer]), (ours.values[layer], theirs.values[layer])):
                    torch.testing.assert_close(a[:, :, :length], b[:, :, :length], rtol=1e-4, atol=1e-5)
    assert trees > 0


def test_settings_validate_the_tree_options():
    assert parse_proposers("spaf+lookup") == ("spaf", "lookup")
    assert loop.resolve_settings({}, proposers="lookup").proposers == ("lookup",)
    assert loop.resolve_settings({"tree_width": 2}).tree_width == 2
    for bad in ({"proposers": "eagle"}, {"proposers": "spaf+spaf"}, {"tree_width": 0}, {"max_nodes": True},
                {"lookup_branches": 1.5}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            loop.resolve_settings({}, **bad)


# ---- the ONNX Runtime engine -------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    from spaf_edge.exporters import export_model

    model = make_tiny_spaf("llama", 0, spaf_config=SpAFConfig(cutoff_layer=2, adapter_dim_ratio=1.0), hidden_size=64)
    return model, export_model(model, tmp_path_factory.mktemp("trees") / "export", progress=False)


@pytest.mark.parametrize("transition", [0, 2])
def test_engine_tree_greedy_equals_the_base(tiny_export, transition):
    """Trees through the exported stacks (tree inputs, compaction) give the base's tokens."""
    from spaf_edge.runtime import Engine

    model, folder = tiny_export
    engine = Engine.from_folder(folder, trees="near")
    assert engine.decoder.proposer.trees
    for prompt in PROMPTS:
        result = engine.generate(prompt, max_new_tokens=30, temperature=0.0, num_draft_tokens=4,
                                 serial_parallel_transition=transition, tree_width=3, max_nodes=10)
        expected = hf_greedy(model.base, prompt, 30)
        assert result.tokens == expected[:len(result.tokens)] and len(result.tokens) >= 1
        assert result.stats.candidates > sum(result.stats.drafted)


def test_engine_verifies_trees_only_where_they_are_exact(tiny_export, monkeypatch):
    """``auto`` verifies trees where the load-time check finds them bitwise, ``near`` anyway (and says
    so), ``off`` never."""
    import spaf_edge.runtime.engine as engine_module
    from spaf_edge.runtime import Engine

    _, folder = tiny_export
    assert Engine.from_folder(folder, trees="off").decoder.proposer.trees is False
    monkeypatch.setattr(engine_module, "check_tree", lambda decoder: False)  # a device that rounds them apart
    auto = Engine.from_folder(folder)
    assert (auto.decoder.proposer.trees, auto.lossless) == (False, auto.rows.lossless)
    near = Engine.from_folder(folder, trees="near")
    assert (near.decoder.proposer.trees, near.lossless) == (True, "near")
    with pytest.raises(ConfigError, match="trees"):
        Engine.from_folder(folder, trees="always")
