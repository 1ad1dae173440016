"""Everything ``spaf-edge bench`` can time: one small runner class per baseline, in a registry.

A runner loads its model once (:meth:`Runner.load`) and then turns prompt token ids into
new token ids plus :class:`~spaf_edge.core.stats.GenerationStats` (:meth:`Runner.generate`).
Every runner gets the same ids, stops at the same EOS ids and at ``max_new_tokens``.
Plain (non-speculative) runners report one verify step per token, so their tau is 1.
A speculative runner names the plain greedy runner of its own runtime (``reference``):
its tokens are checked against that runner's, since quantized runtimes differ from each
other. Importing this module imports no torch, transformers or onnxruntime: each runner
imports its own libraries in :meth:`load`.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from spaf_edge.core.embedding_layout import QUANTIZATION_BITS
from spaf_edge.core.errors import ConfigError, SpAFError
from spaf_edge.core.stats import GenerationStats

_REGISTRY: dict[str, type[Runner]] = {}
PRECISIONS = ("fp32", "fp16")
QUANTIZATIONS = tuple(QUANTIZATION_BITS)  # weight-only, of the SpAF export and of genai's model


@dataclass
class BenchContext:
    """What runners share. JSON-able (minus the shared cache), so a worker process can rebuild it."""

    base_model: str | None = None  # local HF folder of the base model
    export_dir: str | None = None  # SpAF export folder (engine rows)
    provider: str = "cpu"
    threads: int | None = None
    precision: str = "fp32"
    quantization: str | None = None  # None | "int8" | "int4"
    gguf: str | None = None  # GGUF file of the base model (llama.cpp rows)
    max_length: int | None = None  # longest prompt + max new tokens + draft margin
    eos_token_ids: list[int] = field(default_factory=list)
    sample_temperature: float = 0.7
    sample_top_p: float = 0.9
    _shared: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.startswith("_")}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BenchContext:
        return cls(**data)

    def shared(self, key: str, factory: Callable[[], Any]) -> Any:
        """One object per key for all runners of this process (e.g. one engine for two rows)."""
        if key not in self._shared:
            self._shared[key] = factory()
        return self._shared[key]


@dataclass
class RunOutput:
    tokens: list[int]  # new tokens only
    stats: GenerationStats
    speculation: dict[str, int] | None = None  # a speculative baseline's counters (see SPECULATION_KEYS)


# Counters of a speculative baseline's run, summed over runs in the report. forward_passes:
# full-model passes after the prefill; drafted / accepted: draft tokens verified / accepted.
SPECULATION_KEYS = ("forward_passes", "drafted", "accepted")


def register_runner(cls: type[Runner]) -> type[Runner]:
    _REGISTRY[cls.name] = cls
    return cls


def runner_names() -> list[str]:
    return list(_REGISTRY)


def resolve_runner(spec: str) -> type[Runner]:
    """A registered name, or ``module:Class`` for a runner defined elsewhere."""
    if ":" in spec:
        module, _, qualname = spec.partition(":")
        return getattr(importlib.import_module(module), qualname)
    try:
        return _REGISTRY[spec]
    except KeyError:
        raise ConfigError(f"Unknown runner {spec!r}. Known runners: {', '.join(_REGISTRY)}.") from None


class Runner:
    """One way of generating text that the benchmark times."""

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""
    role: ClassVar[str] = "baseline"  # "baseline" or "spaf"
    sampled: ClassVar[bool] = False  # False: greedy (its tokens are checked against the reference)
    requires: ClassVar[tuple[str, ...]] = ()  # modules that must be importable
    install_hint: ClassVar[str] = ""
    needs_base: ClassVar[bool] = False
    needs_export: ClassVar[bool] = False
    parity_with: ClassVar[tuple[str, ...]] = ()  # baselines to pair with although not a SpAF row
    reference: ClassVar[str | None] = None  # plain greedy runner whose tokens this one must reproduce

    def __init__(self, context: BenchContext) -> None:
        self.context = context
        self.settings: str | None = None  # the decoding settings behind the row, set by load (reported)

    @property
    def greedy(self) -> bool:
        return not self.sampled

    @classmethod
    def unavailable_reason(cls, context: BenchContext) -> str | None:
        """Why this runner cannot run here (None when it can)."""
        missing = [module for module in cls.requires if not _importable(module)]
        if missing:
            return f"{', '.join(missing)} not installed; {cls.install_hint}".rstrip("; ")
        if cls.needs_base and not context.base_model:
            return "no base model folder (pass --base-model)"
        if cls.needs_export and not context.export_dir:
            return "no SpAF export (pass --export-dir, or --base-model with torch installed to export one)"
        return None

    def load(self) -> None:
        """Load the model (not timed)."""

    def generate(self, prompt_ids: list[int], max_new_tokens: int, seed: int) -> RunOutput:
        raise NotImplementedError

    def close(self) -> None:
        """Release the model."""


def plain_stats(prompt_tokens: int, tokens: list[int], wall: float, first_token: float) -> GenerationStats:
    """Stats of plain decoding: one full-model pass per new token (tau = 1)."""
    return GenerationStats(
        prompt_tokens=prompt_tokens, new_tokens=len(tokens), verify_steps=len(tokens),
        wall_seconds=wall, first_token_seconds=first_token,
    )


# ---- PyTorch / transformers -------------------------------------------------------
def _hf_generate(model: Any, prompt_ids: list[int], max_new_tokens: int, eos: list[int]) -> RunOutput:
    """Greedy ``model.generate`` on one sequence, timing the first new token with a streamer."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    class FirstTokenTimer(BaseStreamer):
        def __init__(self) -> None:
            self.calls = 0
            self.first = 0.0

        def put(self, value: Any) -> None:
            self.calls += 1  # call 1 carries the prompt, call 2 the first new token
            if self.calls == 2:
                self.first = time.perf_counter()

        def end(self) -> None:
            pass

    ids = torch.tensor([prompt_ids], dtype=torch.long, device=model.device)  # [1, P]
    timer = FirstTokenTimer()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
            temperature=None, top_p=None, top_k=None, eos_token_id=eos or None,
            pad_token_id=eos[0] if eos else None, streamer=timer,
        )
    wall = time.perf_counter() - start
    tokens = [int(t) for t in out[0, len(prompt_ids):].tolist()]
    return RunOutput(tokens, plain_stats(len(prompt_ids), tokens, wall, timer.first - start if timer.first else wall))


@register_runner
class TransformersGreedy(Runner):
    name = "hf"
    label = "transformers generate (PyTorch, greedy)"
    requires = ("torch", "transformers")
    install_hint = "install spaf-edge[train]"
    needs_base = True

    def load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        if self.context.threads:
            torch.set_num_threads(self.context.threads)
        dtype = torch.float16 if self.context.precision == "fp16" else torch.float32
        # The GPU user's alternative is PyTorch on the GPU: follow the engine's provider there.
        gpu = self.context.provider.lower() in ("cuda", "tensorrt") and torch.cuda.is_available()
        device = "cuda" if gpu else "cpu"
        self.model = AutoModelForCausalLM.from_pretrained(self.context.base_model, dtype=dtype).to(device).eval()

    def generate(self, prompt_ids: list[int], max_new_tokens: int, seed: int) -> RunOutput:
        return _hf_generate(self.model, prompt_ids, max_new_tokens, self.context.eos_token_ids)

    def close(self) -> None:
        self.model = None


@register_runner
class OptimumGreedy(Runner):
    """optimum's ORTModelForCausalLM. optimum-onnx pins transformers < 4.58, so it usually lives
    in its own venv: ``--baseline-python optimum=/path/to/venv/bin/python`` (docs/benchmarks.md)."""

    name = "optimum"
    label = "optimum ORTModelForCausalLM (onnxruntime, greedy)"
    requires = ("optimum.onnxruntime",)
    install_hint = (
        "optimum-onnx needs transformers<4.58: install it in its own venv and pass "
        "--baseline-python optimum=VENV/bin/python (see docs/benchmarks.md)"
    )
    needs_base = True

    def load(self) -> None:
        from optimum.onnxruntime import ORTModelForCausalLM

        from spaf_edge.bench.cache import cached_folder, tool_versions

        def export(tmp: Path) -> None:
            with tempfile.TemporaryDirectory(prefix="spaf-optimum-") as scratch:
                source = legacy_config_folder(Path(self.context.base_model), Path(scratch))
                model = ORTModelForCausalLM.from_pretrained(source, export=True)
                model.save_pretrained(tmp)

        versions = tool_versions("optimum-onnx", "transformers")
        folder = cached_folder("optimum", self.context.base_model, self.context.precision, export, **versions)
        self.model = ORTModelForCausalLM.from_pretrained(
            folder, provider=_ort_provider_name(self.context.provider),
            session_options=_ort_session_options(self.context),
        )

    def generate(self, prompt_ids: list[int], max_new_tokens: int, seed: int) -> RunOutput:
        return _hf_generate(self.model, prompt_ids, max_new_tokens, self.context.eos_token_ids)

    def close(self) -> None:
        self.model = None


def legacy_config_folder(folder: Path, scratch: Path) -> Path:
    """``folder`` as transformers 4.x reads it: a transformers-5 ``rope_parameters`` block
    becomes ``rope_theta`` (+ ``rope_scaling``), which 4.x would otherwise silently replace
    by its default theta. Returns ``folder`` itself when nothing needs changing."""
    config = json.loads((folder / "config.json").read_text())
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_theta" in config:
        return folder
    for item in folder.iterdir():
        if item.name != "config.json":
            (scratch / item.name).symlink_to(item.resolve())
    config["rope_theta"] = rope["rope_theta"]
    if rope.get("rope_type", "default") != "default":
        config["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    (scratch / "config.json").write_text(json.dumps(config, indent=2))
    return scratch


# ---- onnxruntime-genai ----------------------------------------------------------
@register_runner
class GenaiGreedy(Runner):
    name = "genai"
    label = "onnxruntime-genai (model builder, greedy)"
    requires = ("onnxruntime_genai",)
    install_hint = "install spaf-edge[baselines]"
    needs_base = True
    speculative_options: ClassVar[dict[str, int] | None] = None  # GeneratorParams.set_speculative_options

    @classmethod
    def unavailable_reason(cls, context: BenchContext) -> str | None:
        from spaf_edge.bench.genai_model import unsupported_reason

        return super().unavailable_reason(context) or unsupported_reason(
            context.precision, context.provider, context.quantization
        )

    def load(self) -> None:
        import onnxruntime_genai as og

        from spaf_edge.bench.genai_model import build_genai_model, genai_config

        context = self.context

        def open_model() -> Any:
            folder = build_genai_model(context.base_model, context.precision, context.provider, context.quantization)
            return og.Model(genai_config(og, folder, context.provider, context.threads))

        self.model = context.shared("genai", open_model)  # genai and genai-ngram run the same model

    def generate(self, prompt_ids: list[int], max_new_tokens: int, seed: int) -> RunOutput:
        import numpy as np
        import onnxruntime_genai as og

        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(prompt_ids) + max_new_tokens, do_sample=False)
        if self.speculative_options:
            params.set_speculative_options(**self.speculative_options)
        eos = set(self.context.eos_token_ids)
        start = time.perf_counter()
        generator = og.Generator(self.model, params)
        generator.append_tokens(np.asarray([prompt_ids], dtype=np.int32))  # prefill
        tokens: list[int] = []
        first = 0.0
        while len(tokens) < max_new_tokens and not generator.is_done():
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
            first = first or time.perf_counter() - start
            if tokens[-1] in eos:
                break
        wall = time.perf_counter() - start
        stats = plain_stats(len(prompt_ids), tokens, wall, first or wall)
        if not self.speculative_options:
            return RunOutput(tokens, stats)
        speculation = genai_speculation(generator.get_speculative_stats())
        stats.verify_steps = 1 + speculation["forward_passes"]  # the prefill gives the first token
        return RunOutput(tokens, stats, speculation)

    def close(self) -> None:
        self.model = None


@register_runner
class GenaiNgram(GenaiGreedy):
    """onnxruntime-genai's own n-gram (prompt-lookup) speculative decoding, greedy, on genai's model."""

    name = "genai-ngram"
    label = "onnxruntime-genai n-gram speculation (greedy)"
    speculative_options = {"ngram_size": 3, "max_draft_tokens": 4}
    parity_with = ("genai",)
    reference = "genai"


def genai_speculation(raw: dict[str, Any]) -> dict[str, int]:
    """genai's speculative stats -> SPECULATION_KEYS (+ its n-gram lookup counters).

    A round that found an n-gram costs a verify pass (plus a re-anchor pass after some
    rounds); a lookup miss falls back to one plain step.
    """
    forward = int(raw["target_forward_passes"]) + int(raw["standard_fallback_steps"])
    return {
        "forward_passes": forward, "drafted": int(raw["draft_tokens_evaluated"]),
        "accepted": int(raw["draft_tokens_accepted"]), "rounds": int(raw["rounds"]),
        "lookup_hits": int(raw["ngram_lookup_hits"]), "lookup_misses": int(raw["ngram_lookup_misses"]),
    }


# ---- llama.cpp (llama-cpp-python) ------------------------------------------------
class _EvalCounter:
    """Wraps ``Llama.eval`` to count model passes and the tokens each one took."""

    def __init__(self, llm: Any) -> None:
        self.inner = llm.eval
        self.batches: list[int] = []
        llm.eval = self

    def __call__(self, tokens: Any) -> Any:
        self.batches.append(len(tokens))
        return self.inner(tokens)


@register_runner
class LlamacppGreedy(Runner):
    """llama-cpp-python on the base model's GGUF file, greedy. Not in any extra: it builds llama.cpp
    from source (~10 min on 2 cores); ``pip install llama-cpp-python`` to include it."""

    name = "llamacpp"
    label = "llama.cpp (llama-cpp-python, GGUF, greedy)"
    requires = ("llama_cpp",)
    install_hint = "pip install llama-cpp-python (builds llama.cpp from source; not part of any extra)"
    lookup: ClassVar[dict[str, int] | None] = None  # LlamaPromptLookupDecoding arguments

    @classmethod
    def unavailable_reason(cls, context: BenchContext) -> str | None:
        reason = super().unavailable_reason(context)
        if reason is None and not context.gguf:
            reason = "no GGUF file of the base model (pass --base-model default or a .gguf file)"
        return reason

    def load(self) -> None:
        from llama_cpp import Llama

        draft = None
        if self.lookup is not None:
            from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

            draft = LlamaPromptLookupDecoding(**self.lookup)
        threads = self.context.threads or None
        self.model = Llama(
            model_path=self.context.gguf, n_ctx=self.context.max_length or 2048, n_batch=512, n_threads=threads,
            n_threads_batch=threads, draft_model=draft, verbose=False,
        )
        self.counter = _EvalCounter(self.model)
        self.label = f"{self.label} [{Path(self.context.gguf).name}]"

    def generate(self, prompt_ids: list[int], max_new_tokens: int, seed: int) -> RunOutput:
        eos = set(self.context.eos_token_ids)
        self.model.reset()  # no reuse of the previous run's prompt prefix
        self.counter.batches = []
        tokens: list[int] = []
        passes: list[int] = []  # passes[i]: model passes made when token i was sampled
        first = 0.0
        start = time.perf_counter()
        stream = self.model.generate(
            list(prompt_ids), temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True
        )
        for token in stream:
            tokens.append(int(token))
            passes.append(len(self.counter.batches))
            first = first or time.perf_counter() - start
            if len(tokens) >= max_new_tokens or tokens[-1] in eos:
                break
        stream.close()
        wall = time.perf_counter() - start
        if self.lookup is None:
            return RunOutput(tokens, plain_stats(len(prompt_ids), tokens, wall, first or wall))
        return self._speculative_output(prompt_ids, tokens, passes, wall, first or wall)

    def _speculative_output(
        self, prompt_ids: list[int], tokens: list[int], passes: list[int], wall: float, first: float
    ) -> RunOutput:
        """Per pass after the prefill: its drafts are the tokens it took beyond the first, and
        the tokens sampled from it beyond the first are the accepted drafts."""
        stats = GenerationStats(
            prompt_tokens=len(prompt_ids), new_tokens=len(tokens), wall_seconds=wall, first_token_seconds=first
        )
        stats.record(0, 0)  # the prefill, which gives the first token
        for index in range(1, passes[-1] if passes else 0):
            sampled = passes.count(index + 1)
            stats.record(self.counter.batches[index] - 1, max(sampled - 1, 0))
        speculation = {
            "forward_passes": stats.verify_steps - 1, "drafted": sum(stats.drafted), "accepted": sum(stats.accepted),
        }
        return RunOutput(tokens, stats, speculation)

    def close(self) -> None:
        self.model = None


@register_runner
class LlamacppLookup(LlamacppGreedy):
    name = "llamacpp-lookup"
    label = "llama.cpp prompt-lookup decoding (llama-cpp-python, GGUF, greedy)"
    lookup = {"max_ngram_size": 2, "num_pred_tokens": 10}
    parity_with = ("llamacpp",)
    reference = "llamacpp"


# ---- the SpAF engine ------------------------------------------------------------
class EngineRunner(Runner):
    """The onnxruntime SpAF engine in one of its modes; rows of one process share one engine."""

    requires = ("onnxruntime", "spaf_edge.runtime")
    install_hint = "the SpAF runtime is part of spaf-edge"
    needs_export = True
    mode: ClassVar[str] = "spaf"
    decoding: ClassVar[dict[str, Any]] = {}  # options over the export's defaults (e.g. which proposers)
    trees: ClassVar[str] = "auto"  # Engine.from_folder's trees: "near" verifies trees where they are not exact

    def load(self) -> None:
        from spaf_edge.runtime import Engine

        context = self.context
        self.engine = context.shared(
            f"engine-trees-{self.trees}",
            lambda: Engine.from_folder(context.export_dir, provider=context.provider, threads=context.threads,
                                       trees=self.trees),
        )
        temperature, top_p = self.sampling
        self.settings = self.engine.settings(temperature=temperature, top_p=top_p, mode=self.mode,
                                             **self.decoding).describe()

    def generate(self, prompt_ids: list[int], max_new_tokens: int, seed: int) -> RunOutput:
        result = self.engine.generate(
            list(prompt_ids), max_new_tokens=max_new_tokens, temperature=self.sampling[0],
            top_p=self.sampling[1], seed=seed, mode=self.mode, chat=False, **self.decoding,
        )
        return RunOutput([int(t) for t in result.tokens], result.stats)

    @property
    def sampling(self) -> tuple[float, float]:
        """(temperature, top_p): greedy, or the context's sampling settings."""
        if self.sampled:
            return self.context.sample_temperature, self.context.sample_top_p
        return 0.0, 1.0

    def close(self) -> None:
        self.engine = None


@register_runner
class EnginePlainGreedy(EngineRunner):
    name = "engine-greedy"
    label = "SpAF engine, plain greedy (no drafts)"
    mode = "greedy"
    parity_with = ("genai", "llamacpp")  # the runtimes a user would pick instead, plain greedy both


@register_runner
class EnginePlainSample(EngineRunner):
    name = "engine-sample"
    label = "SpAF engine, plain sampling (no drafts)"
    mode = "greedy"  # the engine's plain mode; it samples when the temperature is > 0
    sampled = True


@register_runner
class SpafGreedy(EngineRunner):
    name = "spaf"
    label = "SpAF engine, speculative greedy"
    role = "spaf"
    mode = "spaf"
    reference = "engine-greedy"


@register_runner
class SpafChain(SpafGreedy):
    name = "spaf-chain"
    label = "SpAF engine, speculative greedy, SpAF drafts only"
    decoding = {"proposers": "spaf"}


@register_runner
class SpafLookup(SpafGreedy):
    name = "spaf-lookup"
    label = "SpAF engine, speculative greedy, prompt-lookup drafts only"
    decoding = {"proposers": "lookup"}


@register_runner
class SpafTreeNear(SpafGreedy):
    name = "spaf-tree-near"
    label = "SpAF engine, greedy draft trees (runner-up leaves + lookup branches; near-lossless where trees are not exact)"
    decoding = {"proposers": "spaf+lookup", "tree_width": 2, "max_nodes": 12}
    trees = "near"


@register_runner
class SpafSample(EngineRunner):
    name = "spaf-sample"
    label = "SpAF engine, speculative sampling"
    role = "spaf"
    mode = "spaf"
    sampled = True


# ---- runners in another interpreter -------------------------------------------
class RemoteRunner(Runner):
    """A registered runner run by another Python (its own venv) through a pipe.

    Times are measured here around each call; the pipe adds well under a millisecond.
    """

    def __init__(self, context: BenchContext, target: type[Runner], python: str) -> None:
        super().__init__(context)
        self.target = target
        self.python = python
        self.process: subprocess.Popen | None = None
        self.name = target.name
        self.label = f"{target.label} [{python}]"
        self.role = target.role
        self.sampled = target.sampled
        self.parity_with = target.parity_with
        self.reference = target.reference

    def unavailable_reason(self, context: BenchContext) -> str | None:  # type: ignore[override]
        if not Path(self.python).is_file():
            return f"interpreter {self.python} not found"
        if self.target.needs_base and not context.base_model:
            return "no base model folder (pass --base-model)"
        return None

    def load(self) -> None:
        from spaf_edge.bench.memory import WORKER_MODULE, worker_env

        self._errors = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(
            [self.python, "-m", WORKER_MODULE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._errors, text=True, env=worker_env(),
        )
        ready = self._call({"mode": "serve", "runner": self.target.name, "context": self.context.to_dict()})
        self.settings = ready.get("settings")

    def generate(self, prompt_ids: list[int], max_new_tokens: int, seed: int) -> RunOutput:
        reply = self._call({"prompt_ids": list(prompt_ids), "max_new_tokens": max_new_tokens, "seed": seed})
        return RunOutput(reply["tokens"], stats_from_dict(reply["stats"]), reply.get("speculation"))

    def close(self) -> None:
        if self.process is not None:
            self.process.stdin.close()
            self.process.wait(timeout=60)
            self.process = None
            self._errors.close()

    def _call(self, message: dict[str, Any]) -> dict[str, Any]:
        assert self.process is not None and self.process.stdin and self.process.stdout
        self.process.stdin.write(json.dumps(message) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        reply = json.loads(line) if line.strip() else {"error": "the worker exited"}
        if "error" in reply:
            self._errors.seek(0)
            tail = self._errors.read()[-1500:].strip()
            raise SpAFError(f"{self.name} worker ({self.python}) failed: {reply['error']}\n{tail}")
        return reply


def stats_from_dict(data: dict[str, Any]) -> GenerationStats:
    names = {f.name for f in dataclasses.fields(GenerationStats)}
    return GenerationStats(**{k: v for k, v in data.items() if k in names})


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _ort_provider_name(provider: str) -> str:
    """``cpu`` / ``cuda`` / ``CUDAExecutionProvider`` -> the onnxruntime provider name."""
    if provider.endswith("ExecutionProvider"):
        return provider
    names = {"cpu": "CPU", "cuda": "CUDA", "tensorrt": "Tensorrt", "dml": "Dml", "coreml": "CoreML", "qnn": "QNN"}
    return f"{names.get(provider.lower(), provider)}ExecutionProvider"


def _ort_session_options(context: BenchContext) -> Any:
    from spaf_edge.runtime.session import compatible_session_options

    options = compatible_session_options()  # on the engine's global thread pool when it exists
    if context.threads and options.use_per_session_threads:
        options.intra_op_num_threads = context.threads
    return options

