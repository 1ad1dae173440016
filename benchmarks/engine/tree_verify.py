"""Draft trees on the stacks (export format 6): exactness against chains, and the cost of the tree inputs.

``exact``: on an export, prefill a prompt (MT-Bench first turns), verify a small tree in one call, and compare every
node's cutoff state, top state and logits bit for bit with its root-to-node path verified as
a chain through the same graphs from the same cache; then commit a path with
``KVCache.compact`` and compare the cache rows with the chain's. Nodes in breadth-first and
in depth-first order (the first root-to-leaf path then sits in rows 0..d, as in a chain).

``time``: median wall time of one lower + upper call, a one-row decode step and a five-row
verify, for each export in one process (calls alternate, so a busy machine disturbs them
alike, and so does which export goes first), with the median of paired ratios against the
first export. A format-5 export runs its calls without tree inputs; a format-6 export binds
a chain's positions and zero mask, and also runs the five rows as a tree.

``widening``: the graph nodes that turn the tree inputs into GroupQueryAttention's, alone.

usage: python benchmarks/engine/tree_verify.py exact EXPORT_DIR [...] [--prompts 8]
       python benchmarks/engine/tree_verify.py time EXPORT_DIR [...] [--reps 400] [--threads 2]
       python benchmarks/engine/tree_verify.py widening [--reps 400]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto
from tokenizers import Tokenizer

from spaf_edge.core import manifest as manifest_module
from spaf_edge.core.io_names import (
    EMBEDDINGS,
    LOWER_GRAPH,
    TOKENIZER,
    TOTAL_SEQUENCE_LENGTH,
    TREE_BIAS,
    TREE_POSITIONS,
    UPPER_GRAPH,
)
from spaf_edge.core.manifest import Manifest
from spaf_edge.core.shared_weights import SharedWeights
from spaf_edge.exporters.graph_builder import GraphBuilder
from spaf_edge.exporters.layers import make_tree_inputs
from spaf_edge.runtime.buffers import HostBuffer
from spaf_edge.runtime.embeddings import EmbeddingTable
from spaf_edge.runtime.graphs import LowerGraph, TreeInputs, UpperGraph
from spaf_edge.runtime.kv import KVCache
from spaf_edge.runtime.rows import probe_tokens
from spaf_edge.runtime.session import (
    open_shared_session,
    resolve_provider,
    session_options,
)

PROMPT = 100  # cached positions before the measured calls
# root, two children, two grandchildren under each: breadth-first and depth-first orders
BFS_PARENTS = [-1, 0, 0, 1, 1, 2, 2]
DFS_PARENTS = [-1, 0, 1, 1, 0, 4, 4]
TIME_TREE = [-1, 0, 0, 1, 2]  # the five-row verify as a tree: two branches of depth 2


class Stacks:
    """``lower.onnx`` + ``upper.onnx`` of an export with their KV caches and host buffers (no engine)."""

    def __init__(self, folder: str | Path, threads: int = 2, rows: int = 16) -> None:
        folder = Path(folder)
        manifest = Manifest.load(folder, verify_files=False)
        sizes, k = manifest.sizes, manifest.cutoff_layer
        dtype = np.float16 if manifest.dtype == "float16" else np.float32
        provider, shared = resolve_provider("cpu"), SharedWeights(folder)
        sessions = {}
        for name in (LOWER_GRAPH, UPPER_GRAPH):
            sessions[name] = open_shared_session(shared, name, session_options(threads, "session"), provider)

        def cache(layers: range) -> KVCache:
            return KVCache(layers, sizes.num_kv_heads, sizes.head_dim, sizes.max_length, dtype)

        self.manifest = manifest
        self.lower = LowerGraph(sessions[LOWER_GRAPH], cache(range(0, k)))
        self.upper = UpperGraph(sessions[UPPER_GRAPH], cache(range(k, sizes.num_layers)))
        self.embeddings = EmbeddingTable(folder / EMBEDDINGS, sizes.vocab_size, sizes.hidden_size, dtype,
                                         manifest.quantization)
        hidden = sizes.hidden_size
        self.embeds, self.hidden, self.top = (HostBuffer((1, rows, hidden), dtype) for _ in range(3))
        self.logits = HostBuffer((1, rows, sizes.vocab_size), np.float32)
        self.tree = TreeInputs(rows, dtype)

    @property
    def length(self) -> int:
        return self.lower.kv.length

    def rewind(self, length: int) -> None:
        self.lower.kv.rewind_to(length)
        self.upper.kv.rewind_to(length)

    def run(self, tokens: list[int], parents: list[int] | None = None, num_logits: int | None = None) -> None:
        """Both stacks on ``tokens`` after the cache; ``parents``: the rows as a tree (None: a chain)."""
        new = len(tokens)
        num_logits = new if num_logits is None else num_logits
        tree = None
        if parents is not None:
            self.tree.tree(parents)
            tree = self.tree
        self.embeddings.lookup(tokens, self.embeds.array[0, :new])
        self.lower.run(self.embeds.view(0, new), new, self.hidden.view(0, new), tree)
        self.upper.run(self.hidden.view(0, new), new, self.logits.view(0, num_logits), self.top.view(0, new),
                       num_logits, tree)

    def prefill(self, tokens: list[int]) -> None:
        """An empty cache, then ``tokens`` through both stacks in chunks (no logits)."""
        self.rewind(0)
        rows = self.hidden.rows
        for begin in range(0, len(tokens), rows):
            self.run(tokens[begin:begin + rows], num_logits=0)

    def states(self, new: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Copies of the last call's cutoff states, top states [S, H] and logits [S, V]."""
        return self.hidden.array[0, :new].copy(), self.top.array[0, :new].copy(), self.logits.array[0, :new].copy()

    def cache_rows(self, start: int, stop: int) -> list[np.ndarray]:
        """Every layer's key and value rows ``start .. stop-1`` (copies)."""
        rows = []
        for kv in (self.lower.kv, self.upper.kv):
            for buffer in (*kv.keys, *kv.values):
                rows.append(buffer.numpy()[:, :, start:stop].copy())
        return rows


def path_to(parents: list[int], node: int) -> list[int]:
    path = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


def tree_tokens(stacks: Stacks, parents: list[int], root: int) -> list[int]:
    """Plausible tokens: each node's children are its parent's top candidates (from a chain run)."""
    tokens, start = [root], stacks.length
    for node in range(1, len(parents)):
        path = path_to(parents, parents[node])
        stacks.rewind(start)
        stacks.run([tokens[i] for i in path])
        rank = [i for i in range(1, node) if parents[i] == parents[node]]  # earlier siblings
        tokens.append(int(np.argsort(-stacks.logits.array[0, len(path) - 1])[len(rank)]))
    stacks.rewind(start)
    return tokens


def compare(parents: list[int], stacks: Stacks, prompt: list[int]) -> dict:
    """One tree call against every node's chain; then the deepest path's cache rows after compaction."""
    stacks.prefill(prompt[:-1])
    start = stacks.length
    tokens = tree_tokens(stacks, parents, prompt[-1])
    n = len(parents)
    stacks.run(tokens, parents)
    tree_states = stacks.states(n)
    tree_cache = stacks.cache_rows(start, start + n)
    nodes = []
    for node in range(n):
        path = path_to(parents, node)
        stacks.rewind(start)
        stacks.run([tokens[i] for i in path])
        chain = stacks.states(len(path))
        diffs = [float(np.abs(t[node].astype(np.float32) - c[-1].astype(np.float32)).max())
                 for t, c in zip(tree_states, chain)]
        same = all(np.array_equal(t[node], c[-1]) for t, c in zip(tree_states, chain))
        argmax = int(np.argmax(tree_states[2][node])) == int(np.argmax(chain[2][-1]))
        nodes.append({"node": node, "rows": path, "exact": same, "max_abs": diffs, "same_argmax": argmax})
    # commit the last leaf's path: rows moved in place, against the chain's rows
    path = path_to(parents, n - 1)
    stacks.rewind(start)
    stacks.run([tokens[i] for i in path])
    chain_cache = stacks.cache_rows(start, start + len(path))
    stacks.rewind(start)
    stacks.run(tokens, parents)
    stacks.rewind(start)
    for kv in (stacks.lower.kv, stacks.upper.kv):
        kv.compact(path)
    moved = stacks.cache_rows(start, start + len(path))
    layers = [bool(np.array_equal(a, b)) for a, b in zip(moved, chain_cache)]
    in_place = all(np.array_equal(moved[i], tree_cache[i][:, :, path]) for i in range(len(moved)))
    return {"nodes": nodes, "committed": path, "cache_layers_exact": layers, "compaction_moves_rows": in_place,
            "cache_max_abs": max(float(np.abs(a.astype(np.float32) - b.astype(np.float32)).max())
                                 for a, b in zip(moved, chain_cache))}


def mt_bench_prompts(folder: Path, count: int) -> list[list[int]]:
    """The first turns of the first ``count`` MT-Bench questions, tokenized with the export's tokenizer."""
    tokenizer = Tokenizer.from_file(str(Path(folder) / TOKENIZER))
    data = Path(manifest_module.__file__).parent / "data"  # the package's data folder
    lines = (data / "mt_bench_question.jsonl").read_text().splitlines()
    return [tokenizer.encode(json.loads(line)["turns"][0]).ids[:PROMPT] for line in lines[:count]]


def exact(folders: list[str], threads: int, prompts: int) -> None:
    for folder in folders:
        stacks = Stacks(folder, threads)
        for name, parents in (("breadth-first", BFS_PARENTS), ("depth-first", DFS_PARENTS)):
            reports = [compare(parents, stacks, prompt) for prompt in mt_bench_prompts(Path(folder), prompts)]
            print(f"{folder} ({name}, parents {parents}), first prompt:")
            for node in reports[0]["nodes"]:
                cells = ", ".join(f"{label} {d:.3g}" for label, d in zip(("cutoff", "top", "logits"), node["max_abs"]))
                print(f"  node {node['node']} path {node['rows']}: {'bitwise' if node['exact'] else 'differs'}"
                      f" (max abs: {cells}; same argmax: {node['same_argmax']})")
            for node in range(len(parents)):
                rows = [report["nodes"][node] for report in reports]
                print(f"  all {len(reports)} prompts, node {node}: bitwise in {sum(r['exact'] for r in rows)}, "
                      f"same argmax in {sum(r['same_argmax'] for r in rows)}, max abs logits "
                      f"{max(r['max_abs'][2] for r in rows):.3g}")
            layers = [report["cache_layers_exact"] for report in reports]
            print(f"  commit path {reports[0]['committed']}: compaction moved the tree's rows in "
                  f"{sum(r['compaction_moves_rows'] for r in reports)}/{len(reports)} prompts; cache == chain's in "
                  f"{min(map(sum, layers))}-{max(map(sum, layers))}/{len(layers[0])} buffers (max abs "
                  f"{max(r['cache_max_abs'] for r in reports):.3g})")


def timed(stacks: Stacks, tokens: list[int], parents: list[int] | None) -> float:
    stacks.rewind(PROMPT)
    start = time.perf_counter()
    stacks.run(tokens, parents, num_logits=len(tokens))
    return time.perf_counter() - start


def timing(folders: list[str], reps: int, threads: int) -> None:
    all_stacks = [Stacks(folder, threads) for folder in folders]
    prompt = probe_tokens(all_stacks[0].manifest.sizes.vocab_size, PROMPT + 8)
    cases = {"decode 1 row": (prompt[PROMPT:PROMPT + 1], None), "verify 5 rows": (prompt[PROMPT:PROMPT + 5], None),
             "verify 5-row tree": (prompt[PROMPT:PROMPT + 5], TIME_TREE)}
    times: dict[tuple[str, str], list[float]] = {}
    for stacks in all_stacks:
        stacks.prefill(prompt[:PROMPT])
    pairs = list(zip(folders, all_stacks))
    for rep in range(reps):
        for folder, stacks in pairs if rep % 2 else pairs[::-1]:  # alternate which export goes first
            for case, (tokens, parents) in cases.items():
                if parents is not None and not stacks.lower.accepts_trees:
                    continue
                times.setdefault((folder, case), []).append(timed(stacks, tokens, parents))
    rng = np.random.default_rng(0)
    for (folder, case), values in times.items():
        values = np.array(values) * 1e3
        low, high = np.percentile(values, [25, 75])
        line = (f"{folder} format {all_stacks[folders.index(folder)].manifest.format_version}: {case}: median "
                f"{np.median(values):.3f} ms (p25 {low:.3f}, p75 {high:.3f})")
        base = np.array(times[(folders[0], base_case(case))]) * 1e3
        if folder != folders[0] or case not in ("decode 1 row", "verify 5 rows"):
            # paired: each rep's calls ran back to back, so their ratio cancels most of the machine's drift
            ratios = values / base
            medians = np.median(rng.choice(ratios, (2000, len(ratios))), axis=1)
            low, high = np.percentile(medians, [2.5, 97.5])
            line += f"; vs {folders[0]} {base_case(case)}: x{np.median(ratios):.3f} (95% CI {low:.3f}-{high:.3f})"
        print(line)


def base_case(case: str) -> str:
    """The first export's call a case is compared with (a tree with the chain of as many rows)."""
    return "verify 5 rows" if case == "verify 5-row tree" else case


def widening(reps: int, threads: int) -> None:
    """The graph nodes that widen the tree inputs (once per stack call), alone in a session."""
    b = GraphBuilder("widening", np.dtype(np.float32))
    b.input(TOTAL_SEQUENCE_LENGTH, TensorProto.INT32, [])
    b.input(TREE_POSITIONS, TensorProto.INT64, [1, "S"])
    b.input(TREE_BIAS, TensorProto.FLOAT, [1, 1, "S", "S"])
    positions, bias = make_tree_inputs(b, pad_row=True)
    b.output(positions, TensorProto.INT64, [1, "R"])
    b.output(bias, TensorProto.FLOAT, [1, 1, "R", "T"])
    options = session_options(threads, "session")
    session = ort.InferenceSession(b.make_model({}, set()).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    for rows, past in ((1, 100), (5, 100), (5, 1000)):
        feeds = {TOTAL_SEQUENCE_LENGTH: np.array(past + rows, np.int32),
                 TREE_POSITIONS: (past + np.arange(rows))[None], TREE_BIAS: np.zeros((1, 1, rows, rows), np.float32)}
        out = session.run(None, feeds)
        assert out[1].shape == (1, 1, rows + 1, past + rows + 1)
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            session.run(None, feeds)
            times.append(time.perf_counter() - start)
        print(f"S={rows} P={past}: the widening nodes alone: median {np.median(times) * 1e6:.1f} us per session run")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("exact", "time", "widening"))
    parser.add_argument("exports", nargs="*")
    parser.add_argument("--reps", type=int, default=400)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=8, help="MT-Bench prompts the exactness check runs")
    args = parser.parse_args()
    if args.what == "exact":
        exact(args.exports, args.threads, args.prompts)
    elif args.what == "time":
        timing(args.exports, args.reps, args.threads)
    else:
        widening(args.reps, args.threads)


if __name__ == "__main__":
    main()
