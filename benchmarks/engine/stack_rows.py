"""Wall time of one lower + upper call by row count S, for one or more exports in one process.

Calls of the exports alternate, so a busy machine disturbs them alike. Rows run as they are
(``row_calls="native"``): this measures the graphs, not the engine's padding choice; S = 2 is
what a padded one-row step costs.

usage: python benchmarks/engine/stack_rows.py EXPORT_DIR [EXPORT_DIR ...] [--reps 150]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from spaf_edge.runtime import Engine

ROWS = (1, 2, 3, 5, 8, 12, 17)
PROMPT = list(range(1000, 1100))  # 100 cached positions before the measured calls


def call(decoder, rows: int, past: int) -> None:
    decoder.lower.kv.rewind_to(past)
    decoder.upper.kv.rewind_to(past)
    decoder.run_lower([5] * rows, row=0)
    decoder.run_upper(rows, num_logits=rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("exports", nargs="+")
    parser.add_argument("--reps", type=int, default=150)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    engines = [Engine.from_folder(folder, threads=args.threads, verify=False, thread_pool="global",
                                  row_calls="native") for folder in args.exports]
    for engine in engines:
        engine.decoder.buffers.ensure_rows(max(ROWS) + 2, logit_rows=max(ROWS) + 1)
        engine.decoder.prefill(PROMPT)
    past = len(PROMPT) - 1
    times = {folder: {rows: [] for rows in ROWS} for folder in args.exports}
    for _ in range(args.reps):
        for folder, engine in zip(args.exports, engines):
            for rows in ROWS:
                start = time.perf_counter()
                call(engine.decoder, rows, past)
                times[folder][rows].append(time.perf_counter() - start)
    for folder in args.exports:
        one = np.median(times[folder][1])
        cells = " ".join(f"S={rows} {np.median(t) * 1e3:.2f} ms ({np.median(t) / one:.2f}x)"
                         for rows, t in times[folder].items())
        print(f"{folder}: {cells}")


if __name__ == "__main__":
    main()
