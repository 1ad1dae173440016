"""Training checkpoints: SpAF components + optimizer/scheduler/step/RNG state, written atomically.

Layout of ``RUN_DIR/checkpoint`` (replaced in one rename by :func:`save_checkpoint`):
``components/`` (a SpAF components folder, loadable with ``--components``),
``trainer_state.json`` + ``trainer_state.safetensors`` (optimizer, scheduler, step, RNG
states, world size) and ``settings.json``. In a distributed run the main process writes it
alone: ``optimizer`` is its state dict (DDP replicas agree) or, under DeepSpeed ZeRO, the
list of every rank's partition; ``rng_per_rank`` holds each rank's RNG states (``rng`` is
rank 0's). A crash while writing leaves the previous checkpoint in place.

Nothing here unpickles: a run folder may come from someone else, and loading a pickle runs
whatever code it names. The trainer state is a tree of dicts, lists, tuples, numbers,
strings and tensors; the tensors go to the safetensors file and the tree to the JSON file,
with each tensor replaced by ``{"$tensor": key}`` (tuples, dicts with non-string keys and
torch dtypes are tagged the same way). Run folders of older versions (``trainer_state.pt``,
a pickle) are refused unread.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from spaf_edge.core.atomic import atomic_directory
from spaf_edge.core.errors import ConfigError, ModelNotFoundError
from spaf_edge.model import SpAFModel

CHECKPOINT = "checkpoint"
COMPONENTS = "components"
TRAINER_STATE = "trainer_state.json"
TRAINER_TENSORS = "trainer_state.safetensors"
LEGACY_TRAINER_STATE = "trainer_state.pt"  # a pickle: refused, never read
SETTINGS = "settings.json"
STATE_FORMAT = 1
DTYPES = {str(dtype).removeprefix("torch."): dtype for dtype in vars(torch).values()
          if isinstance(dtype, torch.dtype)}


def rng_state() -> dict[str, Any]:
    """This process's RNG states (with the current CUDA device's when there is one), as plain values and tensors."""
    numpy_state = np.random.get_state(legacy=False)
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {**numpy_state, "state": {"key": numpy_state["state"]["key"].tolist(),
                                           "pos": numpy_state["state"]["pos"]}},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    key = np.asarray(numpy_state["state"]["key"], dtype=np.uint32)
    np.random.set_state({**numpy_state, "state": {"key": key, "pos": numpy_state["state"]["pos"]}})
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def encode_state(value: Any, tensors: dict[str, torch.Tensor], where: str = "state") -> Any:
    """``value`` as JSON-able data; its tensors are added to ``tensors`` (CPU copies) under new keys."""
    if value is None or isinstance(value, (bool, str, float)):
        return value
    if isinstance(value, int):
        return int(value)  # IntEnum members (DeepSpeed's ZeRO stage) become plain ints
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = value.detach().cpu().clone()  # a copy: safetensors refuses tensors sharing storage
        return {"$tensor": key}
    if isinstance(value, torch.dtype):
        return {"$dtype": str(value).removeprefix("torch.")}
    if isinstance(value, tuple):
        return {"$tuple": [encode_state(item, tensors, f"{where}[{i}]") for i, item in enumerate(value)]}
    if isinstance(value, list):
        return [encode_state(item, tensors, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(key, str) and not key.startswith("$") for key in value):
            return {key: encode_state(item, tensors, f"{where}.{key}") for key, item in value.items()}
        return {"$items": [[encode_state(key, tensors, where), encode_state(item, tensors, f"{where}[{key!r}]")]
                           for key, item in value.items()]}
    raise TypeError(f"{where}: a {type(value).__name__} cannot be stored in a training checkpoint")


def decode_state(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`encode_state`. Raises KeyError/TypeError/ValueError on malformed data."""
    if isinstance(value, list):
        return [decode_state(item, tensors) for item in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        (tag, content), = value.items()
        if tag == "$tensor":
            return tensors[content]
        if tag == "$dtype":
            return DTYPES[content]
        if tag == "$tuple":
            return tuple(decode_state(item, tensors) for item in content)
        if tag == "$items":
            return {decode_state(key, tensors): decode_state(item, tensors) for key, item in content}
    return {key: decode_state(item, tensors) for key, item in value.items()}


def write_trainer_state(folder: Path, state: dict[str, Any]) -> None:
    """``state`` into ``folder/trainer_state.json`` and ``folder/trainer_state.safetensors``."""
    tensors: dict[str, torch.Tensor] = {}
    tree = encode_state(state, tensors)
    save_file(tensors, str(folder / TRAINER_TENSORS))
    (folder / TRAINER_STATE).write_text(json.dumps({"format": STATE_FORMAT, "state": tree}) + "\n")


def save_checkpoint(
    run_dir: str | Path,
    model: SpAFModel,
    trainer_state: dict[str, Any],
    settings: dict[str, Any],
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``run_dir/checkpoint`` atomically (call on the main process only).

    ``weights`` replaces the model's SpAF state dict (DeepSpeed's fp32 master weights).
    """
    target = Path(run_dir) / CHECKPOINT
    with atomic_directory(target) as tmp:
        model.save_spaf_components(tmp / COMPONENTS, extra_meta={"step": trainer_state["step"]}, state=weights)
        write_trainer_state(tmp, trainer_state)
        (tmp / SETTINGS).write_text(json.dumps(settings, indent=2) + "\n")
    return target


def find_checkpoint(run_dir: str | Path) -> Path | None:
    """The run's latest complete checkpoint, or None.

    Between its two renames, :func:`atomic_directory` parks the previous folder as
    ``.checkpoint.old-PID``; a crash exactly there leaves only that copy, so it is used.
    A checkpoint written by an older version (a pickled trainer state) is refused.
    """
    run_dir = Path(run_dir)
    candidates = [run_dir / CHECKPOINT] + sorted(run_dir.glob(f".{CHECKPOINT}.old-*"))
    for candidate in candidates:
        if all((candidate / name).is_file() for name in (TRAINER_STATE, TRAINER_TENSORS, SETTINGS)):
            return candidate
    for candidate in candidates:
        refuse_legacy(candidate)
    return None


def refuse_legacy(checkpoint: Path) -> None:
    """Raise when ``checkpoint`` holds a pickled trainer state (older versions) and no current one."""
    if (checkpoint / LEGACY_TRAINER_STATE).exists() and not (checkpoint / TRAINER_STATE).exists():
        raise ConfigError(
            f"{checkpoint} was written by an older version of spaf-edge: its {LEGACY_TRAINER_STATE} is a pickle, "
            "which this version does not load (unpickling a file can run code). It cannot be resumed; start a "
            f"new run in another --out folder, from its weights with --init-from {checkpoint / COMPONENTS} "
            "or from scratch."
        )


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """The trainer state saved by :func:`write_trainer_state` (tensors on the CPU)."""
    refuse_legacy(checkpoint)
    try:
        saved = json.loads((checkpoint / TRAINER_STATE).read_text())
        tensors = load_file(str(checkpoint / TRAINER_TENSORS), device="cpu")
        if not isinstance(saved, dict) or saved.get("format") != STATE_FORMAT:
            raise ValueError(f"format {saved.get('format') if isinstance(saved, dict) else None!r} is not "
                             f"{STATE_FORMAT}")
        state = decode_state(saved["state"], tensors)
        if not (isinstance(state, dict) and isinstance(state.get("step"), int)):
            raise ValueError("no step")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError) as exc:
        raise ModelNotFoundError(
            f"Cannot read the trainer state in {checkpoint} ({exc}); the checkpoint is corrupt. "
            "Start a new run without --resume (or with --init-from its components)."
        ) from exc
    return state


def load_checkpoint_settings(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / SETTINGS).read_text())
