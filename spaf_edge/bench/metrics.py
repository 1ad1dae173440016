"""Numbers from measured runs: throughput, tau, acceptance, speedups, token equality.

Speedups come from pairs only: on each prompt, the runner's tokens/s over the
baseline's tokens/s measured right next to it; a pair's speedup over many prompts is the geometric
mean of those ratios (and per category the same over that category's prompts).
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from spaf_edge.bench.runner import PairRecord, RunRecord


def geometric_mean(values: Iterable[float]) -> float:
    values = [v for v in values if v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else 0.0


def summarize_runner(runs: Sequence[RunRecord]) -> dict[str, Any]:
    """Totals of one runner's timed runs. ``tokens_per_second`` = all new tokens / all wall time."""
    tokens = sum(r.new_tokens for r in runs)
    wall = sum(r.wall_seconds for r in runs)
    steps = sum(r.verify_steps for r in runs)
    width = max((len(r.drafted) for r in runs), default=0)
    drafted = [sum(r.drafted[j] for r in runs if j < len(r.drafted)) for j in range(width)]
    accepted = [sum(r.accepted[j] for r in runs if j < len(r.accepted)) for j in range(width)]
    # Decode speed leaves out the prefill: tokens after the first over the time after the first.
    decode_tokens = sum(max(r.new_tokens - 1, 0) for r in runs)
    decode_wall = sum(max(r.wall_seconds - r.first_token_seconds, 0.0) for r in runs)
    summary = {
        "runs": len(runs),
        "new_tokens": tokens,
        "wall_seconds": round(wall, 4),
        "tokens_per_second": tokens / wall if wall > 0 else 0.0,
        "decode_tokens_per_second": decode_tokens / decode_wall if decode_wall > 0 else 0.0,
        "first_token_ms_median": 1000 * statistics.median(r.first_token_seconds for r in runs) if runs else 0.0,
        "tau": tokens / steps if steps else 0.0,
        "acceptance_by_position": [a / d if d else 0.0 for a, d in zip(accepted, drafted)],
        "acceptance_rate": sum(accepted) / sum(drafted) if sum(drafted) else 0.0,
    }
    counted = [r.speculation for r in runs if r.speculation is not None]
    if counted:  # a speculative baseline: its counters summed over runs
        keys = dict.fromkeys(key for c in counted for key in c)
        summary["speculation"] = {key: sum(c.get(key, 0) for c in counted) for key in keys}
    return summary


def summarize_pairs(pairs: Sequence[PairRecord]) -> list[dict[str, Any]]:
    """One entry per (runner, baseline) pair: geometric-mean speedup overall and by category."""
    grouped: dict[tuple[str, str], list[PairRecord]] = defaultdict(list)
    for pair in pairs:
        grouped[(pair.runner, pair.baseline)].append(pair)
    summaries = []
    for (runner, baseline), records in grouped.items():
        by_category: dict[str, list[float]] = defaultdict(list)
        for record in records:
            by_category[record.category].append(record.speedup)
        ratios = [r.speedup for r in records]
        summaries.append({
            "runner": runner,
            "baseline": baseline,
            "prompts": len(records),
            "speedup": geometric_mean(ratios),
            "speedup_min": min(ratios),
            "speedup_max": max(ratios),
            "by_category": {category: geometric_mean(values) for category, values in by_category.items()},
        })
    return summaries


def pick_reference(greedy_runners: Sequence[str]) -> str | None:
    """The token reference: HF transformers greedy when it ran, else the first greedy baseline."""
    if "hf" in greedy_runners:
        return "hf"
    return greedy_runners[0] if greedy_runners else None


def check_equality(
    runs: Sequence[RunRecord], reference: str, others: Sequence[str], own_references: dict[str, str] | None = None
) -> dict[str, Any]:
    """Compare every run of each greedy runner in ``others`` with a reference's tokens on that prompt.

    The reference is ``own_references[name]`` when given (a speculative runner's own plain
    greedy), else ``reference``; each entry names the one it was checked against.
    """
    first_runs: dict[str, dict[int, list[int]]] = defaultdict(dict)
    for run in runs:
        first_runs[run.runner].setdefault(run.prompt_index, run.tokens)
    report: dict[str, Any] = {"reference": reference, "runners": {}}
    for name in others:
        against = (own_references or {}).get(name, reference)
        expected = first_runs[against]
        checked = [r for r in runs if r.runner == name and r.prompt_index in expected]
        mismatches = []
        for run in checked:
            want = expected[run.prompt_index]
            if run.tokens != want:
                mismatches.append({
                    "prompt_id": run.prompt_id,
                    "first_difference": first_difference(run.tokens, want),
                    "tokens": len(run.tokens),
                    "reference_tokens": len(want),
                    "pair": run.pair,
                })
        report["runners"][name] = {
            "reference": against, "equal": len(checked) - len(mismatches), "total": len(checked),
            "mismatches": mismatches,
        }
    return report


def first_difference(a: Sequence[int], b: Sequence[int]) -> int:
    """Index of the first differing token (the shorter length when one is a prefix of the other)."""
    for index, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return index
    return min(len(a), len(b))
