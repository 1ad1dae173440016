"""Soak: many greedy answers in one process on one engine; resident memory and determinism.

    python benchmarks/engine/soak.py EXPORT_DIR [--n 1000] [--tokens 32] [--prompts 20] [--threads 2]
        [--mode spaf|greedy] [--warmup 100]

Answers the ``--prompts`` shortest MT-Bench questions (first turns, chat template) in turn,
``--n`` answers in all, greedy, ``--tokens`` new tokens each. Prints VmRSS (from
/proc/self/status) every 20 answers, and at the end the RSS growth from answer ``--warmup``
to the last one, and whether every repeat of a prompt gave the same tokens as its first
answer. The exit code is 1 when a repeat differed.
"""

from __future__ import annotations

import argparse
import sys
import time

from reload_rss import (
    rss_mib,  # this folder's scripts run as `python benchmarks/engine/NAME.py`
)

EVERY = 20  # answers between RSS samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export")
    parser.add_argument("--n", type=int, default=1000, help="answers in all")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per answer")
    parser.add_argument("--prompts", type=int, default=20, help="distinct prompts (the shortest MT-Bench questions)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mode", choices=("spaf", "greedy"), default="spaf")
    parser.add_argument("--warmup", type=int, default=100, help="answers before the RSS baseline")
    args = parser.parse_args(argv)

    from spaf_edge.core.prompt_sets import load_prompts
    from spaf_edge.runtime import Engine

    prompts = sorted((p.text for p in load_prompts()), key=len)[: args.prompts]
    first: dict[int, list[int]] = {}
    mismatches: list[int] = []
    samples: list[tuple[int, float]] = [(0, rss_mib())]
    tokens = 0
    print(f"start  RSS {samples[0][1]:7.1f} MiB")
    start = time.perf_counter()
    with Engine.from_folder(args.export, threads=args.threads, verify=False) as engine:
        samples.append((0, rss_mib()))
        print(f"loaded RSS {samples[-1][1]:7.1f} MiB")
        for answer in range(1, args.n + 1):
            index = (answer - 1) % len(prompts)
            result = engine.generate(prompts[index], max_new_tokens=args.tokens, temperature=0.0, mode=args.mode)
            tokens += len(result.tokens)
            if first.setdefault(index, result.tokens) != result.tokens:
                mismatches.append(answer)
            if answer % EVERY == 0 or answer == args.n:
                samples.append((answer, rss_mib()))
                rate = tokens / (time.perf_counter() - start)
                print(f"answers {answer:5d}  RSS {samples[-1][1]:7.1f} MiB  {rate:6.1f} tok/s overall"
                      f"  repeats differing {len(mismatches)}", flush=True)
    after_warmup = [rss for answer, rss in samples if answer >= args.warmup] or [samples[-1][1]]
    base, last = after_warmup[0], samples[-1][1]
    growth = 100 * (last - base) / base
    repeats = args.n - len(first)
    print(f"\n{args.n} answers ({tokens} tokens, {len(prompts)} prompts, {repeats} repeats) in "
          f"{time.perf_counter() - start:.0f} s, mode {args.mode}")
    print(f"RSS after answer {args.warmup}: {base:.1f} MiB; after the last: {last:.1f} MiB ({growth:+.2f} %); "
          f"peak {max(rss for _, rss in samples):.1f} MiB")
    print(f"greedy repeats identical to the first answer: {repeats - len(mismatches)}/{repeats}"
          + (f" (differing at answers {mismatches[:10]})" if mismatches else ""))
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
