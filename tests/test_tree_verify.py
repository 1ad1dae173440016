"""Draft trees through the stacks (export format 6): tree inputs, exactness against chains, KV compaction.

A tree call runs every node at position ``P + depth``, attending to the cache and to its
ancestors only. On ONNX Runtime's CPU kernel a node whose ancestors sit in rows ``0 .. d``
of the call (the first root-to-leaf path of a depth-first order) gets the chain's bits; the
other nodes agree with their chains up to rounding (benchmarks/results/cpu-tree-verify/).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import make_tiny_spaf

from spaf_edge.core.errors import ExportFormatError
from spaf_edge.core.io_names import (
    EMBEDDINGS,
    LOWER_GRAPH,
    MANIFEST,
    TREE_BIAS,
    TREE_POSITIONS,
    UPPER_GRAPH,
)
from spaf_edge.core.manifest import DIGEST_FIELD, Manifest, content_digest
from spaf_edge.core.shared_weights import SharedWeights
from spaf_edge.decoding.tree import masked_value
from spaf_edge.exporters import export as export_module
from spaf_edge.exporters.graphs import GraphPlan
from spaf_edge.runtime.buffers import HostBuffer
from spaf_edge.runtime.embeddings import EmbeddingTable
from spaf_edge.runtime.graphs import LowerGraph, TreeInputs, UpperGraph
from spaf_edge.runtime.kv import KVCache
from spaf_edge.runtime.session import (
    open_shared_session,
    resolve_provider,
    session_options,
)
from spaf_edge.runtime.signatures import check_io, expected_io

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPT = [3, 17, 60, 5, 88, 41, 9, 23, 70]  # the last token is the tree's root
BREADTH_FIRST = [-1, 0, 0, 1, 1, 2, 2]  # root, two children, two grandchildren under each
DEPTH_FIRST = [-1, 0, 1, 1, 0, 4, 4]  # the same tree, depth-first: path 0-1-2 in rows 0..2
TOKENS = [70, 11, 12, 13, 14, 15, 16]


def export(model, folder: Path, **kwargs) -> Path:
    """Export without the engine's load-time row check (tested in test_runtime.py)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(export_module, "measure_lossless", lambda folder: None)
        return export_module.export_model(model, folder, progress=False, max_length=64, **kwargs)


def export_format_5(model, folder: Path) -> Path:
    """What spaf-edge wrote before format 6: stacks without tree inputs, a version-5 manifest."""
    shape = GraphPlan.shape.fget
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(GraphPlan, "shape", property(lambda plan: dataclasses.replace(shape(plan), tree=False)))
        patch.setattr(GraphPlan, "tree_inputs", lambda plan, b: None)
        patch.setattr(export_module, "Manifest", functools.partial(Manifest, format_version=5))
        export(model, folder)
    data = json.loads((folder / MANIFEST).read_text())
    del data["tree_attention"]  # the field did not exist
    data[DIGEST_FIELD] = content_digest(data)
    (folder / MANIFEST).write_text(json.dumps(data))
    return folder


class Stacks:
    """The two stacks of an export with their caches and host buffers, as the engine binds them."""

    def __init__(self, folder: Path, rows: int = 16) -> None:
        manifest = Manifest.load(folder)
        sizes, k = manifest.sizes, manifest.cutoff_layer
        shared, provider = SharedWeights(folder), resolve_provider("cpu")
        expected = expected_io(manifest, np.float32)
        sessions = {}
        for name in (LOWER_GRAPH, UPPER_GRAPH):
            sessions[name] = open_shared_session(shared, name, session_options(1, "session"), provider)
            check_io(sessions[name], folder / name, *expected[name])

        def cache(layers: range) -> KVCache:
            return KVCache(layers, sizes.num_kv_heads, sizes.head_dim, sizes.max_length, np.float32)

        self.manifest = manifest
        self.lower = LowerGraph(sessions[LOWER_GRAPH], cache(range(0, k)))
        self.upper = UpperGraph(sessions[UPPER_GRAPH], cache(range(k, sizes.num_layers)))
        self.embeddings = EmbeddingTable(folder / EMBEDDINGS, sizes.vocab_size, sizes.hidden_size, np.float32,
                                         manifest.quantization)
        self.embeds, self.hidden, self.top = (HostBuffer((1, rows, sizes.hidden_size), np.float32) for _ in range(3))
        self.logits = HostBuffer((1, rows, sizes.vocab_size), np.float32)
        self.tree = TreeInputs(rows, np.float32)

    def rewind(self, length: int) -> None:
        self.lower.kv.rewind_to(length)
        self.upper.kv.rewind_to(length)

    def run(self, tokens: list[int], parents: list[int] | None = None) -> list[np.ndarray]:
        """Both stacks on ``tokens`` (a tree when ``parents``): copies of cutoff states, top states, logits."""
        new = len(tokens)
        tree = None
        if parents is not None:
            self.tree.tree(parents)
            tree = self.tree
        self.embeddings.lookup(tokens, self.embeds.array[0, :new])
        self.lower.run(self.embeds.view(0, new), new, self.hidden.view(0, new), tree)
        self.upper.run(self.hidden.view(0, new), new, self.logits.view(0, new), self.top.view(0, new), new, tree)
        return [buffer.array[0, :new].copy() for buffer in (self.hidden, self.top, self.logits)]

    def prefill(self) -> int:
        self.rewind(0)
        self.run(PROMPT[:-1])
        return self.lower.kv.length

    def cache(self, start: int, stop: int) -> list[np.ndarray]:
        """Copies of rows ``start .. stop-1`` of every key and value buffer, lower stack first."""
        return [buffer.numpy()[:, :, start:stop].copy()
                for kv in (self.lower.kv, self.upper.kv) for buffer in (*kv.keys, *kv.values)]


def path_to(parents: list[int], node: int) -> list[int]:
    path = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


@pytest.fixture(scope="module", params=[None, "int4"])
def folder(request, tmp_path_factory):
    model = make_tiny_spaf("llama", hidden_size=64)  # head_dim 16
    return export(model, tmp_path_factory.mktemp("tree") / "export", quantization=request.param)


@pytest.fixture(scope="module")
def stacks(folder):
    return Stacks(folder)


# ---- the tree inputs -----------------------------------------------------------
def test_tree_inputs_hold_depths_and_the_ancestor_mask():
    tree = TreeInputs(2, np.float32)
    tree.tree(BREADTH_FIRST)  # grows past its 2 rows
    n = len(BREADTH_FIRST)
    assert tree.new == n and not tree.is_chain
    np.testing.assert_array_equal(tree.depths[:n], [0, 1, 1, 2, 2, 2, 2])
    ancestors = np.zeros((n, n), dtype=bool)
    for node in range(n):
        ancestors[node, path_to(BREADTH_FIRST, node)] = True
    bias = tree.bias[: n * n].reshape(n, n)
    np.testing.assert_array_equal(bias, np.where(ancestors, 0, masked_value(np.float32)))
    assert np.isfinite(bias).all() and np.isfinite(bias.min() * 2 - 100)  # a score added stays finite
    tree.tree([-1, 0, 1])
    assert tree.is_chain
    tree.chain(4)
    assert tree.is_chain and tree.new == 4 and not tree.bias[:16].any()
    np.testing.assert_array_equal(tree.depths[:4], np.arange(4))
    for parents in ([0], [-1, 1], [-1, 0, 3], [-1, -2], []):
        with pytest.raises(ValueError, match="earlier row"):
            tree.tree(parents)


def test_stacks_widen_the_tree_inputs_once_per_graph(folder):
    """Every layer's attention reads per-row positions and the mask; the widening is built once."""
    manifest = Manifest.load(folder)
    assert manifest.format_version == 6 and manifest.tree_attention
    for name, layers in ((LOWER_GRAPH, manifest.cutoff_layer),
                         (UPPER_GRAPH, manifest.sizes.num_layers - manifest.cutoff_layer)):
        graph = onnx.load(str(folder / name), load_external_data=False).graph
        assert {TREE_POSITIONS, TREE_BIAS} <= {i.name for i in graph.input}
        attention = [node for node in graph.node if node.op_type == "GroupQueryAttention"]
        assert len(attention) == layers
        assert {tuple(node.input[9:11]) for node in attention} == {
            ("/model/attention_tree/position_ids", "/model/attention_tree/attention_bias")}
        widening = [node for node in graph.node if node.name.startswith("/model/attention_tree/")]
        assert len({node.name for node in widening}) == len(widening) < 20


# ---- exactness --------------------------------------------------------------------
def test_a_chain_through_the_tree_inputs_is_the_format_5_graphs_chain(tmp_path):
    """Zero mask + consecutive positions give the bits of the format-5 graphs (no tree inputs) for every
    row and cache entry, and a format-5 folder still loads and verifies chains."""
    model = make_tiny_spaf("llama", hidden_size=64)
    new, old = Stacks(export(model, tmp_path / "v6")), Stacks(export_format_5(model, tmp_path / "v5"))
    assert new.lower.accepts_trees and not old.lower.accepts_trees and not old.upper.accepts_trees
    assert old.manifest.format_version == 5 and not old.manifest.tree_attention
    for stacks in (new, old):
        stacks.prefill()
    for tokens in ([70], [70, 11], [70, 11, 12, 13, 14]):  # a decode step, verify passes
        rows = [stacks.run(tokens) for stacks in (new, old)]
        for a, b in zip(*rows):
            np.testing.assert_array_equal(a, b)
        length = new.lower.kv.length
        for a, b in zip(new.cache(0, length), old.cache(0, length)):
            np.testing.assert_array_equal(a, b)
        for stacks in (new, old):
            stacks.rewind(len(PROMPT) - 1)
    old.tree.tree([-1, 0, 1])  # a chain described as a tree runs on format 5 too
    old.lower.run(old.embeds.view(0, 3), 3, old.hidden.view(0, 3), old.tree)
    old.tree.tree(BREADTH_FIRST)
    with pytest.raises(ValueError, match="chains only.*re-export"):
        old.lower.run(old.embeds.view(0, 7), 7, old.hidden.view(0, 7), old.tree)


def test_format_5_stacks_and_manifest_must_agree(tmp_path):
    model = make_tiny_spaf("llama", hidden_size=64)
    folder = export_format_5(model, tmp_path / "v5")
    data = json.loads((folder / MANIFEST).read_text())
    for version, tree in ((5, True), (6, False)):
        changed = dict(data, format_version=version, tree_attention=tree)
        with pytest.raises(ExportFormatError, match="tree_attention .* does not match format version"):
            Manifest.from_dict(changed)
    manifest = Manifest.load(folder)
    manifest.tree_attention = True  # a manifest announcing tree inputs the graphs lack
    session = open_shared_session(SharedWeights(folder), LOWER_GRAPH, session_options(1, "session"))
    with pytest.raises(ExportFormatError, match="'tree_positions' is missing"):
        check_io(session, folder / LOWER_GRAPH, *expected_io(manifest, np.float32)[LOWER_GRAPH])


def test_the_first_depth_first_path_is_bitwise_a_chain(stacks):
    """Rows 0..2 of a depth-first tree hold the path 0-1-2: the chain's bits, states and logits."""
    start = stacks.prefill()
    tree = stacks.run(TOKENS, DEPTH_FIRST)
    stacks.rewind(start)
    chain = stacks.run(TOKENS[:3])
    for a, b in zip(tree, chain):
        np.testing.assert_array_equal(a[:3], b)


def test_every_node_gets_its_chain_up_to_rounding(stacks):
    """Each node sees its ancestors at its depth's position: its chain's results up to rounding, and far
    from what the same rows give as a chain (the control that the mask and positions matter)."""
    if stacks.manifest.quantization:
        pytest.skip("int8 activations of int4 MatMulNBits amplify the last-bit differences (see the results)")
    start = stacks.prefill()
    tree = stacks.run(TOKENS, BREADTH_FIRST)
    stacks.rewind(start)
    as_chain = stacks.run(TOKENS)
    for node in range(len(BREADTH_FIRST)):
        path = path_to(BREADTH_FIRST, node)
        stacks.rewind(start)
        chain = stacks.run([TOKENS[i] for i in path])
        for a, b, c in zip(tree, chain, as_chain):
            np.testing.assert_allclose(a[node], b[-1], rtol=1e-5, atol=1e-5)
            if path != list(range(len(path))):
                assert np.abs(c[node] - b[-1]).max() > 1e-3


def test_a_tree_needs_a_cached_position(stacks):
    """ONNX Runtime ignores per-row positions in a call without past rows: such a tree is refused."""
    stacks.rewind(0)
    with pytest.raises(ValueError, match="at least one cached position"):
        stacks.run(TOKENS, BREADTH_FIRST)
    stacks.run(TOKENS[:3], [-1, 0, 1])  # a chain is fine


# ---- compaction --------------------------------------------------------------------
def test_compact_commits_the_accepted_path(stacks):
    """The path's rows move to consecutive positions in every layer, and the next step reads them as a
    chain's cache (bitwise in the first layer, whose entries depend on embeddings and positions only)."""
    start = stacks.prefill()
    path = path_to(BREADTH_FIRST, 6)  # [0, 2, 6]
    stacks.rewind(start)
    stacks.run([TOKENS[i] for i in path])
    chain_cache = stacks.cache(start, start + len(path))
    chain_next = stacks.run([33])
    stacks.rewind(start)
    stacks.run(TOKENS, BREADTH_FIRST)
    tree_cache = stacks.cache(start, start + len(BREADTH_FIRST))
    stacks.rewind(start)
    for kv in (stacks.lower.kv, stacks.upper.kv):
        kv.compact(path)
        assert kv.length == start + len(path)
    moved = stacks.cache(start, start + len(path))
    for rows, tree_rows in zip(moved, tree_cache):
        np.testing.assert_array_equal(rows, tree_rows[:, :, path])
    np.testing.assert_array_equal(moved[0], chain_cache[0])  # layer 0 keys
    np.testing.assert_array_equal(moved[len(stacks.lower.kv.keys)], chain_cache[len(stacks.lower.kv.keys)])
    if not stacks.manifest.quantization:
        for a, b in zip(moved, chain_cache):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        for a, b in zip(stacks.run([33]), chain_next):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_compact_checks_its_rows_and_the_device():
    kv = KVCache(range(2), 2, 16, 32, np.float32)
    kv.advance(4)
    for rows in ([1, 1], [2, 1], [-1, 0], [0, 40]):
        with pytest.raises(ValueError, match="must ascend inside the cache"):
            kv.compact(rows)
    before = kv.keys[1].numpy()[:, :, 4:9].copy()
    kv.compact([0, 1])  # already in place: nothing moves
    np.testing.assert_array_equal(kv.keys[1].numpy()[:, :, 4:9], before)
    assert kv.length == 6
    kv.device = "cuda"
    kv.compact([0])
    with pytest.raises(NotImplementedError, match="only on the CPU"):
        kv.compact([0, 2])
