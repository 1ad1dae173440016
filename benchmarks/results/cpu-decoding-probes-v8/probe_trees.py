"""Interleaved-by-setting tok/s and τ of chains, lookup and (near-lossless) trees on every tenth MT-Bench prompt.

Usage: python probe_trees.py EXPORT_DIR
"""

from __future__ import annotations

import sys
import time

from spaf_edge.core.prompt_sets import load_prompts
from spaf_edge.runtime import Engine

CHAINS = {"greedy": dict(mode="greedy"), "chain": dict(proposers="spaf"),
          "lookup": dict(proposers="lookup", lookup_depth=6),
          "chain+lookup(select)": dict(proposers="spaf+lookup", lookup_depth=4)}
TREES = {"tree w2": dict(proposers="spaf", tree_width=2, max_nodes=10),
         "tree w3": dict(proposers="spaf", tree_width=3, max_nodes=12),
         "tree+lookup w2": dict(proposers="spaf+lookup", tree_width=2, max_nodes=12, lookup_depth=4)}


def main() -> None:
    engine = Engine.from_folder(sys.argv[1], threads=2, trees="near")
    print("tree_exact", engine.tree_exact, "lossless", engine.lossless)
    ids = [engine.encode(prompt.text) for prompt in load_prompts("mt-bench")[::10]]
    for trees, settings in ((False, CHAINS), (True, TREES)):
        engine.decoder.proposer.trees = trees
        for name, options in settings.items():
            tokens = steps = 0
            seconds = 0.0
            for prompt_ids in ids:
                start = time.perf_counter()
                result = engine.generate(prompt_ids, max_new_tokens=128, temperature=0.0, **options)
                seconds += time.perf_counter() - start
                tokens += len(result.tokens)
                steps += result.stats.verify_steps
            print(f"{name:24} tok/s {tokens / seconds:6.1f} tau {tokens / steps:.2f}{' (near)' if trees else ''}")


if __name__ == "__main__":
    main()
