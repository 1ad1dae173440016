"""``spaf-edge tune``: the fastest drafting settings of an export on this device, stored in its manifest.

Torch-free. A coarse grid of drafting settings (num_draft_tokens N, serial_parallel_transition
s, draft-stop threshold η) is timed with greedy decoding on calibration prompts, never
MT-Bench (tuning on the benchmark would contaminate it). Successive halving keeps it cheap:
every candidate runs on the first prompts, the best quarter on all of them, next to the
untuned defaults and plain greedy decoding. A second stage times the fastest setting with
each way of combining the proposers (SpAF alone, lookup alone, SpAF + lookup with a lookup
branch replacing SpAF's chain from a match of 1, 2 or 3 tokens). Runs interleave candidates prompt by prompt, so
a change of machine load hits all of them alike. tokens/s = total new tokens / total wall
time. The winner goes into the manifest's ``tuned`` entry, which the engine takes as its
decoding defaults (the manifest's own digest leaves ``tuned`` out, so the export stays valid).
The folder's writability is checked before measuring; a result that cannot be stored is
still returned (and printed by the CLI) with the reason.

Greedy output does not depend on drafting (lossless): every run must reproduce plain
greedy's tokens, and tuning counts the runs that do not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from spaf_edge.core.atomic import atomic_write_text
from spaf_edge.core.errors import ConfigError, ContextLengthError, StorageError
from spaf_edge.core.io_names import MANIFEST
from spaf_edge.core.machine import describe_cpu
from spaf_edge.core.manifest import Manifest
from spaf_edge.core.progress import progress_bar
from spaf_edge.core.prompt_sets import load_prompts
from spaf_edge.decoding.loop import DecodeSettings, resolve_settings
from spaf_edge.runtime.rows import MAX_ROWS

logger = logging.getLogger(__name__)

DRAFTING_KEYS = ("num_draft_tokens", "serial_parallel_transition", "draft_stop_threshold", "proposers",
                 "lookup_min_match", "lookup_start", "lookup_depth", "tree_width")
# Second stage: the chosen drafting setting with each way of combining the proposers (decoding/proposers.py)
# (proposers, lookup_min_match, lookup_start, lookup_depth): a lookup chain's verify rows cost more with int4
# kernels than with fp32 ones; copies that grow while accepted pay on input-grounded prompts
# (benchmarks/results/cpu-decoding-probes-v8, cpu-drafting-policy-v12)
PROPOSER_VARIANTS = (("spaf", 2, 4, 16), ("spaf+lookup", 1, 4, 16), ("spaf+lookup", 2, 4, 16),
                     ("spaf+lookup", 3, 4, 16), ("spaf+lookup", 2, 2, 8), ("spaf+lookup", 2, 8, 8),
                     ("lookup", 2, 4, 16))


def calibration_prompts_path() -> Path:
    """The packaged calibration prompts (written for spaf-edge, see spaf_edge/data/README.md)."""
    return Path(__file__).resolve().parents[1] / "data" / "calibration_prompts.jsonl"


# ---- search space -------------------------------------------------------------
@dataclass(frozen=True)
class Candidate:
    """One drafting setting; ``draft_stop_threshold=None`` means never stop early."""

    num_draft_tokens: int
    serial_parallel_transition: int
    draft_stop_threshold: float | None = None
    proposers: str = "spaf+lookup"  # who drafts (spaf_edge.decoding.proposers)
    lookup_min_match: int = DecodeSettings.lookup_min_match  # the match a lookup branch needs to be the chain
    lookup_start: int = DecodeSettings.lookup_start  # tokens a lookup chain copies after a step that did not
    # accept a whole one; each one that did doubles it
    lookup_depth: int = DecodeSettings.lookup_depth  # tokens a lookup chain copies at most
    tree_width: int = 1  # SpAF candidates per depth (> 1 only where the engine verifies trees exactly)

    @property
    def label(self) -> str:
        eta = "-" if self.draft_stop_threshold is None else f"{self.draft_stop_threshold:g}"
        label = f"N={self.num_draft_tokens} s={self.serial_parallel_transition} eta={eta}"
        if self.proposers != "spaf+lookup" or self.lookup_min_match != DecodeSettings.lookup_min_match:
            match = f" m={self.lookup_min_match}" if self.proposers == "spaf+lookup" else ""
            label += f" {self.proposers}{match}"
        if (self.lookup_start, self.lookup_depth) != (DecodeSettings.lookup_start, DecodeSettings.lookup_depth) \
                and "lookup" in self.proposers:
            label += f" copy={self.lookup_start}..{self.lookup_depth}"
        if self.tree_width > 1:
            label += f" width={self.tree_width}"
        return label

    def engine_options(self) -> dict[str, Any]:
        """Keyword arguments of ``Engine.generate``; every one explicit, so no stored default leaks in."""
        # The engine reads threshold None as "the export's default"; 0 never stops drafting.
        eta = 0.0 if self.draft_stop_threshold is None else self.draft_stop_threshold
        return dict(num_draft_tokens=self.num_draft_tokens,
                    serial_parallel_transition=self.serial_parallel_transition, draft_stop_threshold=eta,
                    proposers=self.proposers, lookup_min_match=self.lookup_min_match, lookup_start=self.lookup_start,
                    lookup_depth=self.lookup_depth, tree_width=self.tree_width)

    def with_proposers(self, proposers: str, lookup_min_match: int, lookup_start: int, lookup_depth: int,
                       tree_width: int = 1) -> Candidate:
        return Candidate(self.num_draft_tokens, self.serial_parallel_transition, self.draft_stop_threshold,
                         proposers, lookup_min_match, lookup_start, lookup_depth, tree_width)

    def to_dict(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in DRAFTING_KEYS}


@dataclass(frozen=True)
class Grid:
    """Every (N, s, η) with s <= N. Defaults: N 1..8, s 0..2, η in {off, 0.3, 0.5, 0.7}."""

    num_draft_tokens: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)
    transitions: tuple[int, ...] = (0, 1, 2)
    thresholds: tuple[float | None, ...] = (None, 0.3, 0.5, 0.7)

    def __post_init__(self) -> None:
        for name, values, least in (("draft tokens", self.num_draft_tokens, 1), ("transitions", self.transitions, 0)):
            bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int) or v < least]
            if not values or bad:
                raise ConfigError(f"Invalid tune grid {name} {list(values)}: give integers >= {least}, e.g. 1,2,3.")
        if max(self.num_draft_tokens) >= MAX_ROWS:
            raise ConfigError(f"Invalid tune grid draft tokens {list(self.num_draft_tokens)}: the engine verifies at "
                              f"most {MAX_ROWS} rows a call, so give at most {MAX_ROWS - 1}.")
        bad = [v for v in self.thresholds if v is not None and not (isinstance(v, (int, float)) and 0 <= v < 1)]
        if not self.thresholds or bad:
            raise ConfigError(
                f"Invalid tune grid thresholds {list(self.thresholds)}: give numbers in [0, 1) or 'none' (off)."
            )
        if not self.candidates():
            raise ConfigError(
                f"The tune grid is empty: every transition {list(self.transitions)} exceeds every number of "
                f"draft tokens {list(self.num_draft_tokens)}, and s <= N is required. Add smaller transitions."
            )

    def candidates(self) -> list[Candidate]:
        return [
            Candidate(n, s, eta)
            for n in sorted(set(self.num_draft_tokens))
            for s in sorted(set(self.transitions)) if s <= n
            for eta in dict.fromkeys(self.thresholds)
        ]

    def to_dict(self) -> dict[str, list]:
        return {"num_draft_tokens": list(self.num_draft_tokens), "transitions": list(self.transitions),
                "thresholds": list(self.thresholds)}


@dataclass
class TuneOptions:
    prompts: str | Path | None = None  # JSONL ('prompt' or 'turns'); None: the packaged calibration prompts
    limit: int | None = None  # use the first N prompts
    max_new_tokens: int = 48  # greedy tokens per prompt and run
    screen_prompts: int = 2  # prompts every candidate runs on before pruning
    keep_fraction: float = 0.25  # share of the candidates that run on every prompt
    chat: bool = True
    provider: str = "cpu"
    threads: int | None = None
    grid: Grid = field(default_factory=Grid)
    progress: bool = True
    store: bool = True  # write the result into the export's manifest (False: only return it)

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "screen_prompts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"Invalid {name}={value!r}: expected an integer >= 1.")
        if not (isinstance(self.keep_fraction, (int, float)) and 0 < self.keep_fraction <= 1):
            raise ConfigError(f"Invalid keep_fraction={self.keep_fraction!r}: expected a number in (0, 1].")


# ---- measurements -----------------------------------------------------------------
PLAIN_GREEDY = "plain greedy"


@dataclass
class Measurement:
    """Totals of one setting over a set of prompts."""

    label: str
    candidate: Candidate | None  # None: plain greedy decoding (no drafts)
    new_tokens: int = 0
    seconds: float = 0.0
    verify_steps: int = 0
    runs: int = 0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def tau(self) -> float:
        return self.new_tokens / self.verify_steps if self.verify_steps else 0.0


@dataclass
class TuneResult:
    folder: Path
    exit_layer: int
    exits: list[int]
    chosen: Measurement
    default: Measurement
    plain_greedy: Measurement
    finals: list[Measurement]  # every candidate timed on every prompt, fastest first
    screened: int  # candidates timed on the screening prompts
    mismatches: int  # runs whose tokens differ from plain greedy's (must be 0: lossless)
    tuned: dict[str, Any]  # the manifest's entry (written unless store_error or not stored)
    stored: bool = False  # written to the manifest
    store_error: str | None = None  # why it could not be written

    @property
    def speedup_vs_default(self) -> float:
        return _ratio(self.chosen, self.default)

    @property
    def speedup_vs_plain_greedy(self) -> float:
        return _ratio(self.chosen, self.plain_greedy)

    def table(self, rows: int = 8) -> str:
        """The fastest settings, the untuned defaults and plain greedy, aligned."""
        shown = self.finals[:rows]
        if not any(row is self.default for row in shown):
            shown.append(self.default)
        entries = [*shown, self.plain_greedy]
        names = [row.label + (" (default)" if row is self.default else "") + (" *" if row is self.chosen else "")
                 for row in entries]
        width = max(28, *map(len, names))
        lines = [f"{'setting':<{width}} {'tok/s':>8} {'tau':>6} {'vs greedy':>10}"]
        for name, row in zip(names, entries):
            lines.append(f"{name:<{width}} {row.tokens_per_second:>8.1f} {row.tau:>6.2f} "
                         f"{_ratio(row, self.plain_greedy):>9.2f}x")
        return "\n".join(lines)

    def summary(self) -> str:
        verdict = (
            f"Chosen {self.chosen.label}: {self.chosen.tokens_per_second:.1f} tok/s, "
            f"{self.speedup_vs_default:.2f}x over the untuned defaults ({self.default.label}), "
            f"{self.speedup_vs_plain_greedy:.2f}x over plain greedy."
        )
        if self.speedup_vs_plain_greedy < 1:
            verdict += " Plain greedy is faster here (the drafts are rarely accepted): consider `run --mode greedy`."
        if self.stored:
            return f"{verdict}\nStored in {self.folder / MANIFEST}; `spaf-edge run` uses it by default."
        if self.store_error:
            return f"{verdict}\nNOT stored: {self.store_error}"
        return f"{verdict}\nNot stored (--no-store): give `spaf-edge run` these settings to use them."


def _ratio(a: Measurement, b: Measurement) -> float:
    return a.tokens_per_second / b.tokens_per_second if b.tokens_per_second > 0 else 0.0


# ---- tuning ---------------------------------------------------------------------------
def tune_export(folder: str | Path, options: TuneOptions | None = None) -> TuneResult:
    """Time the grid on the calibration prompts, store the fastest setting in the manifest."""
    from spaf_edge.runtime.engine import Engine

    options = options or TuneOptions()
    folder = Path(folder)
    if options.store:
        check_writable(folder)
    engine = Engine.from_folder(folder, provider=options.provider, threads=options.threads)
    prompt_path = Path(options.prompts) if options.prompts is not None else calibration_prompts_path()
    prompts = encode_calibration(engine, prompt_path, options)
    candidates = options.grid.candidates()
    default_setting = default_candidate(engine)
    default = Measurement(default_setting.label, default_setting)

    reference = [run_plain(engine, ids, options.max_new_tokens).tokens for ids in prompts]  # also warms up
    run_candidate(engine, prompts[0], min(8, options.max_new_tokens), default.candidate)
    timer = Timer(engine, prompts, reference, options)

    screen = prompts[: options.screen_prompts]
    keep = max(1, math.ceil(len(candidates) * options.keep_fraction))
    finalists = [Measurement(c.label, c) for c in candidates]
    if keep < len(candidates):
        timer.measure(finalists, range(len(screen)), "screen")
        finalists = sorted(finalists, key=lambda m: -m.tokens_per_second)[:keep]
        finalists = [Measurement(m.label, m.candidate) for m in finalists]
    finalists = [m for m in finalists if m.candidate != default.candidate]
    plain = Measurement(PLAIN_GREEDY, None)
    timer.measure([*finalists, default, plain], range(len(prompts)), "final")

    finals = sorted([*finalists, default], key=lambda m: -m.tokens_per_second)
    trees = engine.decoder.proposer.trees  # trees are tried only where the engine verifies them exactly
    variants = [Measurement(c.label, c) for c in proposer_variants(finals[0].candidate, trees)]
    if variants:  # the fastest drafting setting with each way of combining the proposers
        timer.measure(variants, range(len(prompts)), "proposers")
        finals = sorted([*finals, *variants], key=lambda m: -m.tokens_per_second)
    chosen = finals[0]
    tuned = tuned_entry(engine, chosen, default, plain, timer.mismatches, prompt_path, len(prompts),
                        len(candidates), options)
    store_error = None
    if options.store:
        try:
            write_tuned(folder, tuned)
        except StorageError as exc:  # the measurements are not lost: the caller still gets (and shows) them
            store_error = str(exc)
    if timer.mismatches:
        logger.warning("%d tuning runs gave tokens that differ from plain greedy's: greedy decoding is not "
                       "lossless on this export and provider; run `spaf-edge validate`.", timer.mismatches)
    return TuneResult(folder, engine.manifest.cutoff_layer, list(engine.manifest.exits), chosen, default, plain,
                      finals, len(candidates), timer.mismatches, tuned, options.store and store_error is None,
                      store_error)


def tune_exports(folders: Sequence[str | Path], options: TuneOptions | None = None) -> list[TuneResult]:
    """Tune exports of several exits of the same components (each keeps its own result); fastest first."""
    fingerprints = {}
    for folder in folders:
        manifest = Manifest.load(folder, verify_files=False)
        fingerprints.setdefault(manifest.base_fingerprint, []).append(str(folder))
    if options is None or options.store:
        for folder in folders:  # before minutes of measuring, not after
            check_writable(Path(folder))
    if len(fingerprints) > 1:
        groups = "; ".join(", ".join(group) for group in fingerprints.values())
        raise ConfigError(
            f"The exports are of different base models ({groups}). Tune several folders together only to "
            "compare the exits of one model; tune the others separately."
        )
    results = [tune_export(folder, options) for folder in folders]
    return sorted(results, key=lambda result: -result.chosen.tokens_per_second)


class Timer:
    """Runs settings on prompts, round-robin per prompt, adding up tokens and wall time."""

    def __init__(self, engine, prompts: list[list[int]], reference: list[list[int]], options: TuneOptions) -> None:
        self.engine = engine
        self.prompts = prompts
        self.reference = reference
        self.options = options
        self.mismatches = 0

    def measure(self, rows: list[Measurement], prompt_indices: range, phase: str) -> None:
        bar = progress_bar(total=len(rows) * len(prompt_indices), desc=f"tune ({phase})", unit="run",
                           disable=not self.options.progress, leave=False)
        with bar:
            for index in prompt_indices:
                for row in rows:
                    ids = self.prompts[index]
                    start = time.perf_counter()
                    if row.candidate is None:
                        result = run_plain(self.engine, ids, self.options.max_new_tokens)
                    else:
                        result = run_candidate(self.engine, ids, self.options.max_new_tokens, row.candidate)
                    row.seconds += time.perf_counter() - start
                    row.new_tokens += len(result.tokens)
                    row.verify_steps += result.stats.verify_steps
                    row.runs += 1
                    self.mismatches += int(result.tokens != self.reference[index])
                    bar.update()


def proposer_variants(candidate: Candidate, trees: bool = False) -> list[Candidate]:
    """``candidate`` with the other :data:`PROPOSER_VARIANTS` (and, with ``trees``, SpAF's runner-up
    leaves: tree widths 2 and 3)."""
    variants = [candidate.with_proposers(*variant) for variant in PROPOSER_VARIANTS]
    if trees:
        variants += [candidate.with_proposers("spaf+lookup", 2, 4, 16, width) for width in (2, 3)]
    return [variant for variant in variants if variant != candidate]


def run_plain(engine, ids: list[int], max_new_tokens: int):
    return engine.generate(ids, max_new_tokens=max_new_tokens, temperature=0.0, mode="greedy")


def run_candidate(engine, ids: list[int], max_new_tokens: int, candidate: Candidate):
    return engine.generate(ids, max_new_tokens=max_new_tokens, temperature=0.0, **candidate.engine_options())


def default_candidate(engine) -> Candidate:
    """What `run` uses without a tuned entry: the export's SpAF config with the provider's floors."""
    settings = resolve_settings(engine.untuned_defaults)
    return Candidate(settings.num_draft_tokens, settings.serial_parallel_transition, settings.draft_stop_threshold)


def encode_calibration(engine, path: Path, options: TuneOptions) -> list[list[int]]:
    """Token ids of the calibration prompts; each must leave room for ``max_new_tokens``."""
    if engine.tokenizer is None:
        raise ConfigError(f"{engine.folder} has no tokenizer, which tune needs to encode its prompts. "
                          "Re-export the model with its tokenizer.")
    prompts = load_prompts(path, limit=options.limit)
    encoded = [engine.encode(prompt.text, chat=options.chat) for prompt in prompts]
    room = engine.max_length - options.max_new_tokens
    for prompt, ids in zip(prompts, encoded):
        if len(ids) > room:
            raise ContextLengthError(
                f"Calibration prompt {prompt.id} of {path} has {len(ids)} tokens; with --max-new-tokens "
                f"{options.max_new_tokens} the export's context of {engine.max_length} allows {room}. "
                "Use shorter prompts or fewer new tokens."
            )
    return encoded


def tuned_entry(engine, chosen: Measurement, default: Measurement, plain: Measurement, mismatches: int,
                prompt_path: Path, num_prompts: int, num_candidates: int, options: TuneOptions) -> dict[str, Any]:
    """The manifest's ``tuned`` entry: the settings (read by the engine), then how they were found."""
    return {
        **chosen.candidate.to_dict(),
        "tokens_per_second": round(chosen.tokens_per_second, 2),
        "tau": round(chosen.tau, 3),
        "speedup_vs_default": round(_ratio(chosen, default), 3),
        "speedup_vs_plain_greedy": round(_ratio(chosen, plain), 3),
        "default": {**default.candidate.to_dict(), "tokens_per_second": round(default.tokens_per_second, 2)},
        "plain_greedy_tokens_per_second": round(plain.tokens_per_second, 2),
        "exit_layer": engine.manifest.cutoff_layer,
        "provider": engine.provider.name,
        "device": describe_device(engine.provider.name),
        "threads": options.threads,  # null: the engine's default (every usable core)
        "thread_pool": engine.thread_pool,
        "calibration": {
            "prompts": str(prompt_path),
            "prompts_sha256": hashlib.sha256(prompt_path.read_bytes()).hexdigest(),
            "num_prompts": num_prompts,
            "screen_prompts": min(options.screen_prompts, num_prompts),
            "max_new_tokens": options.max_new_tokens,
            "chat": options.chat,
            "grid": options.grid.to_dict(),
            "candidates": num_candidates,
            "keep_fraction": options.keep_fraction,
            "greedy_mismatches": mismatches,
        },
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def describe_device(provider: str) -> str:
    """The CPU (model, family/model, vector extensions, cores), or the GPU's name for CUDA providers
    (when nvidia-smi answers)."""
    if provider in ("cuda", "tensorrt"):
        try:
            done = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                  capture_output=True, text=True, timeout=10, check=True)
            names = [line.strip() for line in done.stdout.splitlines() if line.strip()]
            if names:
                return names[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return describe_cpu(logical_cores=True)


# ---- manifest -------------------------------------------------------------------------
def check_writable(folder: Path) -> None:
    """StorageError unless a file can be created in ``folder``, where the manifest is replaced.

    A missing folder passes: loading it reports that.
    """
    if not folder.is_dir():
        return
    try:
        handle, probe = tempfile.mkstemp(dir=folder, prefix=".spaf-tune-check.", suffix=".tmp")
    except OSError as exc:
        raise StorageError(
            f"{folder} is not writable ({exc.strerror or exc}); tune stores its result in its {MANIFEST}. Make the "
            "folder writable, tune a writable copy of it, or pass --no-store (store=False) to only print the result."
        ) from exc
    os.close(handle)
    os.unlink(probe)


def write_tuned(folder: str | Path, tuned: dict[str, Any] | None) -> None:
    """Set (or with None, clear) the manifest's ``tuned`` entry, atomically; other fields stay as they are."""
    folder = Path(folder)
    Manifest.load(folder, verify_files=False)  # a clear error for a missing or broken export
    path = folder / MANIFEST
    data = json.loads(path.read_text())
    data["tuned"] = tuned
    Manifest.from_dict(data, str(path))  # still a valid manifest
    try:
        atomic_write_text(path, json.dumps(data, indent=2) + "\n")
    except StorageError:
        raise
    except OSError as exc:
        raise StorageError(
            f"Cannot write {path} ({exc.strerror or exc}). Make {folder} writable, or tune a writable copy of it."
        ) from exc


def reset_tuned(folder: str | Path) -> bool:
    """Remove the ``tuned`` entry; False when there was none."""
    had = Manifest.load(folder, verify_files=False).tuned is not None
    if had:
        write_tuned(folder, None)
    return had
