"""Interleaved tok/s and τ of lookup settings against plain greedy on every fifth prompt of a set.

Usage: python probe_lookup_depth.py EXPORT_DIR [mt-bench|grounded] [int4|grounded]
(the third argument picks the config set that was run for that table in README.md).
"""

from __future__ import annotations

import sys
import time

from spaf_edge.core.prompt_sets import load_prompts
from spaf_edge.runtime import Engine

CONFIGS = {
    "int4": [dict(mode="greedy"), dict(proposers="spaf"), dict(lookup_depth=4), dict(lookup_depth=6),
             dict(lookup_depth=8), dict(lookup_depth=4, lookup_min_match=3), dict(lookup_depth=8, lookup_min_match=3),
             dict(lookup_depth=4, lookup_min_match=1)],
    "grounded": [dict(mode="greedy"), dict(lookup_depth=8), dict(lookup_depth=12), dict(lookup_depth=16),
                 dict(lookup_depth=16, lookup_min_match=3), dict(lookup_depth=16, num_draft_tokens=6)],
}


def main() -> None:
    folder, prompt_set = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "mt-bench"
    configs = CONFIGS[sys.argv[3] if len(sys.argv) > 3 else "int4"]
    engine = Engine.from_folder(folder, threads=2)
    ids = [engine.encode(prompt.text) for prompt in load_prompts(prompt_set)[::5]]
    totals = [[0, 0.0, 0] for _ in configs]  # tokens, seconds, verify steps
    for prompt_ids in ids:
        for total, config in zip(totals, configs):  # interleaved per prompt
            start = time.perf_counter()
            result = engine.generate(prompt_ids, max_new_tokens=128, temperature=0.0, **config)
            total[1] += time.perf_counter() - start
            total[0] += len(result.tokens)
            total[2] += result.stats.verify_steps
    base = totals[0][0] / totals[0][1]
    for (tokens, seconds, steps), config in zip(totals, configs):
        print(f"{config!s:55} {tokens / seconds:6.1f} tok/s  x{tokens / seconds / base:.2f} vs greedy  "
              f"tau {tokens / steps:.2f}")


if __name__ == "__main__":
    main()
