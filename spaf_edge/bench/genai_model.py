"""Build (once, offline) and open the onnxruntime-genai model of a local HF folder.

The genai model builder runs as ``python -m onnxruntime_genai.models.builder`` with the
Hugging Face hub switched off, so it reads only the local folder. Builds are cached
under ``<spaf-edge cache>/genai/``.
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
from spaf_edge.errors import SpAFError

# Our provider name -> (builder --execution_provider, genai runtime provider; None = default CPU).
_PROVIDERS = {"cpu": ("cpu", None), "cuda": ("cuda", "cuda"), "dml": ("dml", "dml"), "webgpu": ("webgpu", "webgpu")}
# Precision/provider pairs the builder supports (its own list: no fp16 on CPU).
_SUPPORTED = {("fp32", "cpu"), ("fp32", "cuda"), ("fp16", "cuda"), ("fp16", "dml")}
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def _provider_key(provider: str) -> str:
    """``cpu`` / ``CUDAExecutionProvider`` -> ``cpu`` / ``cuda``."""
    return provider.lower().removesuffix("executionprovider")


def unsupported_reason(precision: str, provider: str) -> str | None:
    key = _provider_key(provider)
    if key not in _PROVIDERS:
        return f"onnxruntime-genai has no {provider!r} provider in this benchmark (cpu, cuda, dml, webgpu)"
    if (precision, key) not in _SUPPORTED:
        return f"the genai model builder makes no {precision} model for {key}"
    return None


def build_genai_model(base_model: str | Path, precision: str, provider: str, timeout: float = 1800) -> Path:
    """The cached genai model folder of ``base_model`` (built on first use, hub off)."""
    builder_ep = _PROVIDERS[_provider_key(provider)][0]

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
