"""Build (once, offline) and open the onnxruntime-genai model of a local HF folder.

The genai model builder runs as ``python -m onnxruntime_genai.models.builder`` with the
Hugging Face hub switched off, so it reads only the local folder. Builds are cached
under ``<spaf-edge cache>/genai/``, keyed by the builder's precision (``fp32``, ``fp16``,
``int4``, ``int8``) and execution provider.

Weight-only quantization maps onto the builder's own precisions: ``-p int4`` and
``-p int8`` both write ``MatMulNBits`` nodes (4 or 8 bits, block 32, symmetric; accuracy
level 4, i.e. int8 activations, on the CPU), for the LM head too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from spaf_edge.bench.cache import cached_folder, tool_versions
from spaf_edge.core.errors import SpAFError

# Our provider name -> (builder --execution_provider, genai runtime provider; None = default CPU).
_PROVIDERS = {"cpu": ("cpu", None), "cuda": ("cuda", "cuda"), "dml": ("dml", "dml"), "webgpu": ("webgpu", "webgpu")}
# Builder precision/provider pairs (its own list: no fp16 on CPU; int8 checked on CPU only, and named for webgpu).
_SUPPORTED = {
    ("fp32", "cpu"), ("fp32", "cuda"), ("fp16", "cuda"), ("fp16", "dml"),
    ("int4", "cpu"), ("int4", "cuda"), ("int4", "dml"), ("int4", "webgpu"), ("int8", "cpu"), ("int8", "webgpu"),
}
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def _provider_key(provider: str) -> str:
    """``cpu`` / ``CUDAExecutionProvider`` -> ``cpu`` / ``cuda``."""
    return provider.lower().removesuffix("executionprovider")


def builder_precision(precision: str, quantization: str | None) -> str:
    """The builder's ``-p``: the weight quantization when there is one, else the float precision."""
    return quantization or precision


def unsupported_reason(precision: str, provider: str, quantization: str | None = None) -> str | None:
    key = _provider_key(provider)
    if key not in _PROVIDERS:
        return f"onnxruntime-genai has no {provider!r} provider in this benchmark (cpu, cuda, dml, webgpu)"
    built = builder_precision(precision, quantization)
    if (built, key) not in _SUPPORTED:
        return f"the genai model builder makes no {built} model for {key}"
    return None


def build_genai_model(
    base_model: str | Path, precision: str, provider: str, quantization: str | None = None, timeout: float = 1800
) -> Path:
    """The cached genai model folder of ``base_model`` (built on first use, hub off)."""
    builder_ep = _PROVIDERS[_provider_key(provider)][0]
    precision = builder_precision(precision, quantization)

    def build(out: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="spaf-genai-") as scratch:
            command = [
                sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(base_model),
                "-o", str(out), "-p", precision, "-e", builder_ep, "-c", scratch,
            ]
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=timeout, env={**os.environ, **OFFLINE_ENV}
            )
        if done.returncode != 0 or not (out / "genai_config.json").is_file():
            tail = (done.stderr or done.stdout)[-2000:]
            raise SpAFError(
                f"The onnxruntime-genai model builder failed on {base_model} (exit {done.returncode}):\n{tail}\n"
                "Check that the folder is a supported HF model, or skip this baseline with --runners."
            )

    versions = tool_versions("onnxruntime-genai", "transformers")
    return cached_folder("genai", base_model, precision, build, provider=builder_ep, **versions)


def genai_config(og: Any, folder: Path, provider: str, threads: int | None) -> Any:
    """An ``og.Config`` for ``folder`` with the provider and thread count applied."""
    config = og.Config(str(folder))
    runtime_provider = _PROVIDERS[_provider_key(provider)][1]
    if runtime_provider is not None:
        config.clear_providers()
        config.append_provider(runtime_provider)
    if threads:
        options = {"intra_op_num_threads": int(threads), "inter_op_num_threads": 1}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
    return config
