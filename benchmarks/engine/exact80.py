"""SpAF with an export's default settings == the same export's plain greedy, on all 80 MT-Bench first turns.

Usage: python benchmarks/engine/exact80.py EXPORT_DIR OUT.json [--threads 2] [--max-new-tokens 128]

Each prompt runs plain greedy, then SpAF, back to back; the summary has how many answers are
identical, both speeds, τ, the engine's lossless verdict and the settings used.
"""

from __future__ import annotations

import argparse
import json
import time

from spaf_edge.core.prompt_sets import load_prompts
from spaf_edge.runtime import Engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export")
    parser.add_argument("out")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args()
    engine = Engine.from_folder(args.export, threads=args.threads)
    rows = []
    totals = {"spaf_tokens": 0, "spaf_seconds": 0.0, "greedy_tokens": 0, "greedy_seconds": 0.0, "steps": 0}
    for prompt in load_prompts("mt-bench"):
        ids = engine.encode(prompt.text)
        start = time.perf_counter()
        plain = engine.generate(ids, max_new_tokens=args.max_new_tokens, temperature=0.0, mode="greedy")
        middle = time.perf_counter()
        spaf = engine.generate(ids, max_new_tokens=args.max_new_tokens, temperature=0.0)
        end = time.perf_counter()
        totals["greedy_tokens"] += len(plain.tokens)
        totals["greedy_seconds"] += middle - start
        totals["spaf_tokens"] += len(spaf.tokens)
        totals["spaf_seconds"] += end - middle
        totals["steps"] += spaf.stats.verify_steps
        rows.append({"id": prompt.id, "identical": spaf.tokens == plain.tokens, "tokens": len(spaf.tokens),
                     "tau": spaf.stats.tau})
    summary = {
        "export": args.export, "lossless": engine.lossless, "tree_exact": engine.tree_exact,
        "identical": sum(row["identical"] for row in rows), "prompts": len(rows),
        "spaf_tok_s": totals["spaf_tokens"] / totals["spaf_seconds"],
        "greedy_tok_s": totals["greedy_tokens"] / totals["greedy_seconds"],
        "tau": totals["spaf_tokens"] / totals["steps"], "settings": str(engine.settings()),
    }
    with open(args.out, "w") as handle:
        json.dump({"summary": summary, "rows": rows}, handle, indent=1)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
