"""ONNX Runtime sessions of the engine: execution providers and thread settings.

Torch-free. The engine opens four sessions (lower, upper, drafter, draft head) that run one after
another, never at the same time, so their thread pools must not compete for cores: see
:func:`session_options` and docs/runtime.md for the measured choice.
"""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from spaf_edge.core.config import THREAD_POOL_ENV, THREAD_POOLS
from spaf_edge.core.errors import (
    ConfigError,
    ExportFormatError,
    ProviderUnavailableError,
)
from spaf_edge.core.shared_weights import SharedWeights


@dataclass(frozen=True)
class Provider:
    name: str  # the --provider value
    ort_name: str  # onnxruntime's execution provider name
    device: str  # where KV buffers live: an OrtValue device type
    fallbacks: tuple[str, ...] = ()  # providers registered after it (CPU is always last)


PROVIDERS = {
    p.name: p
    for p in (
        Provider("cpu", "CPUExecutionProvider", "cpu"),
        Provider("cuda", "CUDAExecutionProvider", "cuda"),
        Provider("tensorrt", "TensorrtExecutionProvider", "cuda", ("CUDAExecutionProvider",)),
        Provider("dml", "DmlExecutionProvider", "dml"),
        Provider("coreml", "CoreMLExecutionProvider", "cpu"),
        Provider("qnn", "QNNExecutionProvider", "cpu"),
    )
}

# What onnxruntime raises for unreadable or invalid graphs (its own types, not RuntimeError).
ORT_ERRORS = (
    _ort_state.Fail, _ort_state.InvalidArgument, _ort_state.NoSuchFile, _ort_state.InvalidProtobuf,
    _ort_state.InvalidGraph, _ort_state.RuntimeException, _ort_state.NotImplemented, RuntimeError, ValueError,
)


def resolve_provider(name: str) -> Provider:
    """The provider called ``name``; raise if it is unknown or not in this onnxruntime build."""
    key = name.lower()
    if key not in PROVIDERS:
        raise ConfigError(f"Unknown provider {name!r}; choose one of {', '.join(PROVIDERS)}.")
    provider = PROVIDERS[key]
    available = ort.get_available_providers()
    if provider.ort_name not in available:
        raise ProviderUnavailableError(
            f"Execution provider {provider.ort_name} ('--provider {key}') is not available in this "
            f"onnxruntime build; available: {', '.join(available)}. Install the onnxruntime package "
            "built for it (e.g. onnxruntime-gpu for cuda/tensorrt, onnxruntime-directml for dml, "
            "onnxruntime-qnn for qnn) or use --provider cpu."
        )
    return provider


def provider_list(provider: Provider) -> list[str]:
    names = [provider.ort_name, *provider.fallbacks, "CPUExecutionProvider"]
    return list(dict.fromkeys(names))


# ---- threads -------------------------------------------------------------
_state = {"global_threads": None, "cuda_loaded": False}  # process-wide, as ORT's global pool is


def default_threads() -> int:
    """Cores this process may use (affinity-aware)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def check_thread_pool(kind: str | None) -> str:
    """``kind``, or the process default: ``$SPAF_EDGE_THREAD_POOL``, else ``session``."""
    source = "thread_pool"
    if kind is None:
        source, kind = THREAD_POOL_ENV, os.environ.get(THREAD_POOL_ENV) or "session"
    if kind not in THREAD_POOLS:
        raise ConfigError(f"Invalid {source}={kind!r}: expected one of {', '.join(THREAD_POOLS)}.")
    return kind


def global_pool_threads() -> int | None:
    """Threads of ONNX Runtime's process-wide pool once this process created it, else None."""
    return _state["global_threads"]


def _create_global_pool(threads: int) -> None:
    current = _state["global_threads"]
    if current is None:
        ort.set_global_thread_pool_sizes(threads, 1)
        _state["global_threads"] = threads
    elif current != threads:
        raise ConfigError(
            f"ONNX Runtime's process-wide thread pool already has {current} threads and cannot be resized; "
            f"use threads={current}, or thread_pool='session' in a process without the global pool."
        )


def session_options(threads: int | None = None, thread_pool: str | None = None) -> ort.SessionOptions:
    """Options for one of the engine's sessions.

    The sessions run strictly one after another, so their pools must not compete for
    cores. ``thread_pool``:

    - ``"session"`` (the library's default): each session gets ``threads`` intra-op threads
      whose idle workers sleep instead of spinning (a spinning pool of the session that
      just ran steals the cores the next one needs). Safe next to any other ORT user.
    - ``"global"`` (the CLI's default): ONNX Runtime's process-wide pool of ``threads``,
      shared by all sessions, with spinning workers; 15 % faster plain decoding at two
      threads here (docs/runtime.md, "Threads"). Once it exists, ONNX Runtime refuses
      every session of the process that keeps per-session threads: sessions made here,
      and options from :func:`compatible_session_options`, comply; other code's may not.

    With one thread there is no pool to share and ``"global"`` creates none; but once the
    process has the global pool, every session runs on it, whatever it asks for.
    """
    threads = threads or default_threads()
    pool = check_thread_pool(thread_pool)
    if pool == "global" and threads > 1:
        _create_global_pool(threads)
    options = compatible_session_options()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if options.use_per_session_threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    # Errors only: shared weights are overridable initializers by design, which ORT warns about.
    options.log_severity_level = 3
    return options


def compatible_session_options() -> ort.SessionOptions:
    """Fresh ``SessionOptions`` that ONNX Runtime accepts in this process (on the global pool once it exists)."""
    options = ort.SessionOptions()
    if global_pool_threads() is not None:
        options.use_per_session_threads = False
    return options


def open_shared_session(
    shared: SharedWeights, graph: str, options: ort.SessionOptions | None = None, provider: Provider = PROVIDERS["cpu"],
) -> ort.InferenceSession:
    """A session of ``shared.folder/graph`` on the shared weights, which the session keeps alive
    (ONNX Runtime does not own those buffers: they must outlive it)."""
    if options is None:
        options = compatible_session_options()
        options.log_severity_level = 3  # ORT warns about overridable initializers, which are by design here
    session = open_session(shared.folder / graph, shared.add_to(options, graph), provider)
    session.spaf_shared_weights = shared
    return session


def open_session(path: Path, options: ort.SessionOptions, provider: Provider) -> ort.InferenceSession:
    """An InferenceSession for ``path``; a missing or corrupt file raises ExportFormatError."""
    if not path.is_file():
        raise ExportFormatError(f"{path} is missing. The export is incomplete: re-run `spaf-edge export`.")
    if provider.name == "dml":  # DirectML supports neither memory patterns nor parallel execution
        options.enable_mem_pattern = False
    if provider.device == "cuda":
        load_cuda_libraries()
    try:
        session = ort.InferenceSession(str(path), options, providers=provider_list(provider))
    except _ort_state.EPFail as exc:
        raise ProviderUnavailableError(
            f"{provider.ort_name} failed to set up {path.name} ({str(exc).strip()[:300]}). Check the provider's "
            "drivers and libraries, or use --provider cpu."
        ) from exc
    except ORT_ERRORS as exc:
        raise ExportFormatError(
            f"onnxruntime cannot load {path} ({type(exc).__name__}: {str(exc).strip()[:300]}). The file is "
            "truncated, corrupt or from an incompatible exporter: re-run `spaf-edge export`."
        ) from exc
    if provider.ort_name not in session.get_providers():
        # onnxruntime's Python API retries on the CPU, with a warning only, when a provider fails to start.
        raise ProviderUnavailableError(
            f"{provider.ort_name} did not start for {path.name}; onnxruntime fell back to "
            f"{', '.join(session.get_providers())}. For cuda/tensorrt, install the CUDA and cuDNN libraries "
            "onnxruntime-gpu was built for (`pip install onnxruntime-gpu[cuda,cudnn]`, or a PyTorch with the same "
            "CUDA major version), or use --provider cpu."
        )
    return session


def load_cuda_libraries() -> None:
    """Load CUDA and cuDNN from pip's NVIDIA packages or PyTorch, where onnxruntime-gpu can do so.

    ``onnxruntime.preload_dlls`` (onnxruntime >= 1.21) finds them where the system loader
    would not; it does nothing in builds without CUDA.
    """
    if not _state["cuda_loaded"] and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    _state["cuda_loaded"] = True


def release_freed_memory() -> None:
    """Hand the heap memory that closed sessions freed back to the system (glibc only; else a no-op).

    Freeing one session's weights raises glibc's dynamic mmap threshold to 32 MiB, so the next
    session's weights and prepacked buffers come from the heap, which ``free`` rarely shrinks:
    without this, a process that loads and closes engines keeps about one engine's weights
    resident (docs/runtime.md, "Closing an engine").
    """
    if not sys.platform.startswith("linux"):
        return
    process = ctypes.CDLL(None)  # the process's own symbols: libc's among them
    if hasattr(process, "malloc_trim"):  # glibc; not musl
        process.malloc_trim(0)
