"""The measurement loop: warm up every runner, then time SpAF/baseline pairs back to back.

For each prompt and each pair (SpAF row, baseline) both runners generate from the same
token ids, one right after the other; the order alternates between consecutive pairs
and prompts, so slow drifts of the machine (thermal, other load) do not favour either
side. A runner that is in no pair (e.g. no SpAF engine) runs once per prompt on its own.
Wall time is measured here, around each ``generate`` call, with one clock for all.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from spaf_edge.bench.baselines import Runner
from spaf_edge.core.prompt_sets import BenchPrompt

log = logging.getLogger(__name__)
WARMUP_TOKENS = 8


@dataclass
class RunRecord:
    runner: str
    prompt_index: int
    prompt_id: str
    category: str
    prompt_tokens: int
    new_tokens: int
    wall_seconds: float
    first_token_seconds: float
    verify_steps: int
    drafted: list[int]
    accepted: list[int]
    tokens: list[int]
    pair: str | None = None  # "runner/baseline" when timed as part of a pair
    speculation: dict[str, int] | None = None  # a speculative baseline's counters (baselines.SPECULATION_KEYS)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tokens_per_second": self.tokens_per_second}


@dataclass
class PairRecord:
    runner: str  # the contender: a SpAF row, or the engine's plain mode in the runtime-parity pair
    baseline: str
    prompt_index: int
    prompt_id: str
    category: str
    runner_first: bool
    runner_tokens_per_second: float
    baseline_tokens_per_second: float

    @property
    def speedup(self) -> float:
        if self.baseline_tokens_per_second <= 0:
            return 0.0
        return self.runner_tokens_per_second / self.baseline_tokens_per_second

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "speedup": self.speedup}


@dataclass
class Measurements:
    runs: list[RunRecord] = field(default_factory=list)
    pairs: list[PairRecord] = field(default_factory=list)


def plan_pairs(runners: dict[str, Runner]) -> list[tuple[str, str]]:
    """Pairs ``(runner, baseline)`` to time: each greedy SpAF row against every greedy
    baseline; each sampling SpAF row against the baselines that sample too (the plain
    engine when none does); then each runner's ``parity_with`` baselines (runtime checks,
    e.g. the engine's plain greedy against onnxruntime-genai)."""
    baselines = [name for name, r in runners.items() if r.role == "baseline"]
    pairs = []
    for name, runner in runners.items():
        if runner.role != "spaf":
            continue
        same = [b for b in baselines if runners[b].greedy == runner.greedy]
        if not same and "engine-greedy" in runners:
            same = ["engine-greedy"]
        pairs.extend((name, b) for b in same)
    for name, runner in runners.items():
        pairs.extend((name, other) for other in runner.parity_with if other in runners)
    return pairs


def measure(
    prompts: Sequence[BenchPrompt],
    prompt_ids: Sequence[list[int]],
    runners: dict[str, Runner],
    pairs: Sequence[tuple[str, str]],
    max_new_tokens: int,
    seed: int = 0,
    warmup_tokens: int = WARMUP_TOKENS,
    clock: Callable[[], float] = time.perf_counter,
    progress: Callable[[str], None] | None = None,
) -> Measurements:
    """Time every pair on every prompt (and runners outside pairs on their own)."""
    if len(prompts) != len(prompt_ids):
        raise ValueError("prompts and prompt_ids differ in length")
    for name, runner in runners.items():
        if warmup_tokens:
            runner.generate(prompt_ids[0], min(warmup_tokens, max_new_tokens), seed)
    solo = [name for name in runners if not any(name in pair for pair in pairs)]
    result = Measurements()
    for i, (prompt, ids) in enumerate(zip(prompts, prompt_ids)):
        prompt_seed = seed + i  # every sampling runner gets the same seed on a prompt
        for name in solo:
            result.runs.append(_timed(runners[name], name, i, prompt, ids, max_new_tokens, prompt_seed, clock))
        for p, (contender, baseline) in enumerate(pairs):
            contender_first = (i + p) % 2 == 0
            order = (contender, baseline) if contender_first else (baseline, contender)
            label = f"{contender}/{baseline}"
            runs = {
                name: _timed(runners[name], name, i, prompt, ids, max_new_tokens, prompt_seed, clock, label)
                for name in order
            }
            result.runs.extend(runs[name] for name in order)
            result.pairs.append(PairRecord(
                runner=contender, baseline=baseline, prompt_index=i, prompt_id=prompt.id, category=prompt.category,
                runner_first=contender_first, runner_tokens_per_second=runs[contender].tokens_per_second,
                baseline_tokens_per_second=runs[baseline].tokens_per_second,
            ))
        if progress is not None:
            progress(f"prompt {i + 1}/{len(prompts)} ({prompt.category}) done")
    return result


def _timed(
    runner: Runner, name: str, index: int, prompt: BenchPrompt, ids: list[int], max_new_tokens: int, seed: int,
    clock: Callable[[], float], pair: str | None = None,
) -> RunRecord:
    start = clock()
    out = runner.generate(ids, max_new_tokens, seed)
    wall = clock() - start
    stats = out.stats
    return RunRecord(
        runner=name, prompt_index=index, prompt_id=prompt.id, category=prompt.category, prompt_tokens=len(ids),
        new_tokens=len(out.tokens), wall_seconds=wall, first_token_seconds=stats.first_token_seconds,
        verify_steps=stats.verify_steps, drafted=list(stats.drafted), accepted=list(stats.accepted),
        tokens=list(out.tokens), pair=pair, speculation=out.speculation,
    )
