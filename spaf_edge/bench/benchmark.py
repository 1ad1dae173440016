"""``run_benchmark``: prompts -> token ids -> runners -> timed pairs -> memory -> report.

Every installed runner and the SpAF engine run in this one process on the same token
ids (the base model's chat template applied once); runners that are not installed are
skipped with a note. Peak memory is measured afterwards, one fresh process per runner.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from spaf_edge.bench import metrics
from spaf_edge.bench.baselines import (
    PRECISIONS,
    QUANTIZATIONS,
    BenchContext,
    RemoteRunner,
    Runner,
    resolve_runner,
    runner_names,
)
from spaf_edge.bench.memory import measure_memory
from spaf_edge.bench.report import write_report
from spaf_edge.bench.runner import Measurements, measure, plan_pairs
from spaf_edge.core.errors import ConfigError, ModelNotFoundError
from spaf_edge.core.machine import describe_machine, load_average
from spaf_edge.core.prompt_sets import BenchPrompt, encode_prompts, load_prompts

log = logging.getLogger(__name__)
EXPORT_MIN_LENGTH = 2048
DRAFT_MARGIN = 16  # room for drafts past max_new_tokens in the export's KV buffers
GGUF_SOURCE = "spaf_source.json"  # written by models.loading.convert_gguf


@dataclass
class BenchOptions:
    name: str | None = None
    output_root: str | Path = Path("benchmarks") / "results"
    prompts: str | Path | None = None  # None: packaged MT-Bench first turns
    limit: int | None = None
    per_category: int | None = None
    max_new_tokens: int = 128
    chat: bool = True
    base_model: str | None = "default"
    components: str | Path | None = None
    export_dir: str | Path | None = None
    provider: str = "cpu"
    precision: str = "fp32"
    quantization: str | None = None  # None (or "none") | "int8" | "int4": weight-only, export and genai model
    threads: int | None = None
    runners: list[str] | None = None  # None: every registered runner
    remote_python: dict[str, str] = field(default_factory=dict)  # runner -> interpreter of its own venv
    memory: bool = True
    plot: bool = True
    seed: int = 0
    sample_temperature: float = 0.7
    sample_top_p: float = 0.9
    command: str = "spaf_edge.bench.run_benchmark"

    def __post_init__(self) -> None:
        if self.quantization == "none":
            self.quantization = None

    def validate(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"Invalid precision {self.precision!r}: expected one of {', '.join(PRECISIONS)}.")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ConfigError(
                f"Invalid --quantize {self.quantization!r}: expected none, {' or '.join(QUANTIZATIONS)}."
            )
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens={self.max_new_tokens}: ask for at least 1 token.")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads={self.threads}: give an integer >= 1 (or leave it out).")
        unknown = [n for n in (self.runners or []) + list(self.remote_python) if n not in runner_names()]
        if unknown:
            raise ConfigError(f"Unknown runner(s) {', '.join(unknown)}. Known runners: {', '.join(runner_names())}.")


def run_benchmark(options: BenchOptions, progress: Callable[[str], None] | None = None) -> tuple[dict[str, Any], Path]:
    """Run the benchmark described by ``options``; return the result and its report folder."""
    options.validate()
    if options.export_dir is not None:  # before anything loads
        check_export_quantization(Path(options.export_dir), options.quantization)
    say = progress or log.info
    machine = describe_machine(options.provider, options.threads)
    prompts = load_prompts(options.prompts, options.limit, options.per_category)
    base = _resolve_base(options)
    prompt_ids = encode_prompts(prompts, prompt_encoder(base, options.export_dir, options.chat))
    max_length = max(len(ids) for ids in prompt_ids) + options.max_new_tokens + DRAFT_MARGIN
    export_dir = _resolve_export(options, base, say, max_length)
    context = BenchContext(
        base_model=str(base) if base else None, export_dir=str(export_dir) if export_dir else None,
        provider=options.provider, threads=options.threads, precision=options.precision,
        quantization=options.quantization, gguf=gguf_of(base), max_length=max_length,
        sample_temperature=options.sample_temperature, sample_top_p=options.sample_top_p,
    )
    context.eos_token_ids = eos_token_ids(base, export_dir)
    runners, skipped = load_runners(options.runners or runner_names(), context, options.remote_python, say)
    try:
        pairs = plan_pairs(runners)
        say(f"Timing {len(prompts)} prompts: runners {', '.join(runners)}; pairs {pairs}")
        measured = measure(prompts, prompt_ids, runners, pairs, options.max_new_tokens, options.seed, progress=say)
    finally:
        for runner in runners.values():
            runner.close()
    memory = {}
    if options.memory:
        for name in runners:
            say(f"Measuring peak memory of {name} in a fresh process")
            memory[name] = measure_memory(
                name, context.to_dict(), prompt_ids[0], options.max_new_tokens, options.remote_python.get(name)
            )
    machine["load_average_end"] = load_average()
    result = assemble_result(options, machine, context, prompts, prompt_ids, runners, skipped, measured, memory)
    out_dir = write_report(result, Path(options.output_root) / result["name"], plot=options.plot)
    return result, out_dir


def load_runners(
    names: list[str], context: BenchContext, remote_python: dict[str, str], say: Callable[[str], None]
) -> tuple[dict[str, Runner], dict[str, dict[str, str]]]:
    """Instantiate and load each runner; the ones that cannot run are skipped with a reason.

    SpAF engine rows load first (the engine sets up ONNX Runtime's shared thread pool). A
    baseline that fails to load is skipped; a SpAF row that fails to load is an error.
    """
    runners: dict[str, Runner] = {}
    skipped: dict[str, dict[str, str]] = {}
    classes = sorted((resolve_runner(n) for n in names), key=lambda cls: not cls.needs_export)
    for cls in classes:
        python = remote_python.get(cls.name)
        runner = RemoteRunner(context, cls, python) if python else cls(context)
        reason = runner.unavailable_reason(context)
        if reason:
            skipped[cls.name] = {"status": "skipped", "note": reason}
            say(f"Skipping {cls.name}: {reason}")
            continue
        say(f"Loading {cls.name} ({runner.label})")
        try:
            runner.load()
        except Exception as exc:  # a broken baseline must not sink the others; the reason is reported
            if runner.role == "spaf":
                raise
            log.warning("Loading %s failed", cls.name, exc_info=True)
            skipped[cls.name] = {"status": "failed", "note": f"failed to load: {type(exc).__name__}: {exc}"}
            continue
        runners[cls.name] = runner
    ordered = {n: runners[n] for n in names if n in runners}
    return ordered, {n: skipped[n] for n in names if n in skipped}


def assemble_result(
    options: BenchOptions, machine: dict[str, Any], context: BenchContext, prompts: list[BenchPrompt],
    prompt_ids: list[list[int]], runners: dict[str, Runner], skipped: dict[str, dict[str, str]],
    measured: Measurements, memory: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """Everything in one JSON-able dict (the schema of results.json)."""
    created = datetime.now(timezone.utc)
    categories = list(dict.fromkeys(p.category for p in prompts))
    summaries: dict[str, Any] = {}
    for name in (options.runners or runner_names()):
        if name in runners:
            runner = runners[name]
            runs = [r for r in measured.runs if r.runner == name]
            summaries[name] = {
                "label": runner.label, "role": runner.role, "greedy": runner.greedy, "status": "measured",
                "settings": runner.settings, **metrics.summarize_runner(runs), "memory": memory.get(name),
            }
        elif name in skipped:
            cls = resolve_runner(name)
            summaries[name] = {"label": cls.label, "role": cls.role, "greedy": not cls.sampled, **skipped[name]}
    # Plain greedy baselines are checked against one reference (hf when it ran); a speculative
    # runner against its own runtime's plain greedy, since quantized runtimes differ from each other.
    greedy = [n for n, r in runners.items() if r.greedy and r.role == "baseline" and r.reference is None]
    reference = metrics.pick_reference(greedy)
    others = [n for n, r in runners.items() if r.greedy and n != reference]
    own = {n: r.reference for n, r in runners.items() if r.reference in runners}
    equality = metrics.check_equality(measured.runs, reference, others, own) if reference else None
    weights = f"-{options.quantization}" if options.quantization else ""
    name = options.name or f"{Path(context.base_model or context.export_dir or 'model').name}-{options.precision}" \
        f"{weights}-{options.provider}-{created.strftime('%Y%m%d-%H%M%S')}"
    return {
        "name": name,
        "created": created.isoformat(timespec="seconds"),
        "command": options.command,
        "settings": {
            "prompts": str(options.prompts or "MT-Bench first turns (packaged)"),
            "limit": options.limit, "per_category": options.per_category, "categories": categories,
            "max_new_tokens": options.max_new_tokens, "chat": options.chat, "precision": options.precision,
            "quantization": options.quantization or "none",
            "provider": options.provider, "threads": options.threads, "seed": options.seed,
            "sample_temperature": options.sample_temperature, "sample_top_p": options.sample_top_p,
            "eos_token_ids": context.eos_token_ids,
        },
        "machine": machine,
        "models": {"base_model": context.base_model, "export_dir": context.export_dir},
        "runners": summaries,
        "pairs": metrics.summarize_pairs(measured.pairs),
        "equality": equality,
        "prompts": [
            {"id": p.id, "category": p.category, "prompt_tokens": len(ids), "text": p.text}
            for p, ids in zip(prompts, prompt_ids)
        ],
        "runs": [r.to_dict() for r in measured.runs],
        "pair_runs": [p.to_dict() for p in measured.pairs],
        "notes": _notes(machine),
    }


def eos_token_ids(base: Path | None, export_dir: Path | None) -> list[int]:
    """EOS ids every runner stops at: the base's configs and the export's manifest, merged."""
    ids: set[int] = set()
    files = [base / "generation_config.json", base / "config.json"] if base else []
    for path in files:
        if path.is_file():
            value = json.loads(path.read_text()).get("eos_token_id")
            ids.update([value] if isinstance(value, int) else value or [])
    if export_dir is not None:
        from spaf_edge.core.manifest import Manifest

        ids.update(Manifest.load(export_dir, verify_files=False).eos_token_ids)
    return sorted(ids)


def gguf_of(base: Path | None) -> str | None:
    """The GGUF file a base folder was converted from (``spaf_source.json``), when it still exists."""
    if base is None or not (base / GGUF_SOURCE).is_file():
        return None
    gguf = json.loads((base / GGUF_SOURCE).read_text()).get("gguf")
    return gguf if gguf and Path(gguf).is_file() else None


def prompt_encoder(base: Path | None, export_dir: str | Path | None, chat: bool) -> Callable[[str], list[int]]:
    """Text -> ids with the base's HF tokenizer (or, without transformers, the export's tokenizer)."""
    if base is not None:
        try:
            from transformers import AutoTokenizer
        except ImportError:
            pass
        else:
            from spaf_edge.prompts import encode_prompt

            tokenizer = AutoTokenizer.from_pretrained(str(base))
            return lambda text: encode_prompt(tokenizer, text, chat=chat)
    if export_dir is None:
        raise ConfigError("No tokenizer: pass --base-model (with transformers installed) or --export-dir.")
    from spaf_edge.core.manifest import Manifest
    from spaf_edge.runtime.tokenizer import TextTokenizer

    manifest = Manifest.load(export_dir, verify_files=False)
    tokenizer = TextTokenizer.from_folder(Path(export_dir), manifest.chat_template)
    return lambda text: tokenizer.encode_prompt(text, chat=chat)


def _resolve_base(options: BenchOptions) -> Path | None:
    if options.base_model is None:
        return None
    from spaf_edge.models.loading import resolve_base_model

    try:
        return resolve_base_model(options.base_model)
    except (ModelNotFoundError, ImportError) as exc:
        if options.export_dir is None:
            raise
        log.warning("No base model for the baselines (%s); benchmarking the export alone.", exc)
        return None


def _resolve_export(options: BenchOptions, base: Path | None, say: Callable[[str], None], needed: int) -> Path | None:
    """``--export-dir`` as given, or a cached export of ``--base-model`` + ``--components``."""
    if options.export_dir is not None:
        return Path(options.export_dir)
    if base is None:
        return None
    try:
        import torch  # noqa: F401  (the exporter needs it)

        from spaf_edge.bench.exports import cached_export
    except ImportError as exc:
        say(f"No SpAF export: torch is needed to export one ({exc}); pass --export-dir instead.")
        return None
    max_length = max(EXPORT_MIN_LENGTH, -(-needed // 256) * 256)  # rounded up: fewer distinct cached exports
    say(f"Exporting (or reusing the cached export of) {base} + {options.components or 'untrained SpAF modules'}")
    return cached_export(base, options.components, options.precision, max_length, options.quantization)


def check_export_quantization(export_dir: Path, quantization: str | None) -> None:
    """``--export-dir`` must hold the weights ``--quantize`` asks for (genai's model is built to match)."""
    from spaf_edge.core.manifest import Manifest

    found = Manifest.load(export_dir, verify_files=False).quantization
    if found != quantization:
        raise ConfigError(
            f"{export_dir} was exported with --quantize {found or 'none'} (its manifest) but the benchmark asks "
            f"for --quantize {quantization or 'none'}: pass --quantize {found or 'none'}, or an export made with "
            f"`spaf-edge export --quantize {quantization or 'none'}`."
        )


def _notes(machine: dict[str, Any]) -> list[str]:
    notes = []
    cores = machine.get("logical_cores") or 1
    loads = [x for x in (machine.get("load_average"), machine.get("load_average_end")) if x]
    # The benchmark itself keeps about --threads cores busy; more than the cores means other work too.
    if any(load[0] > cores for load in loads):
        notes.append(
            f"The machine was busy (1-min load average {[load[0] for load in loads]} on {cores} cores): "
            "absolute timings are noisy; the back-to-back pairs keep ratios fairer than absolute numbers."
        )
    return notes
