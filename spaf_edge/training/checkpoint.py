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

Compact state (``spaf-edge train --compact-state``): the optimizer's moment tensors (AdamW's
``exp_avg`` and ``exp_avg_sq``) are stored in bfloat16 instead of float32, each tagged
``{"$compact": [key, "float32"]}`` and cast back to its own dtype on load; the components, the
step, the scheduler, the RNG states and the data position stay exact. That makes a checkpoint
of the shipped default 34 MB instead of 51 MB (docs/training.md, "Training that survives
machines"). Paths are never stored here; the run's data path in ``settings.json`` is relative
to the folder the run was started from when the data lies inside it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
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
COMPACT_DTYPE = torch.bfloat16  # moments of a compact state: fp32's range (fp16 flushes small exp_avg_sq to 0)
COMPACT_STORED = (torch.bfloat16, torch.float16)  # what a "$compact" tensor may be stored as
COMPACT_NEEDS_TORCH_OPTIMIZER = ("--compact-state needs a plain torch optimizer; a DeepSpeed ZeRO state holds the "
                                 "fp32 master weights in its partitions. Drop --compact-state or --deepspeed.")


@dataclass(frozen=True)
class Compact:
    """A tensor to store in ``dtype``; :func:`decode_state` casts it back to its own dtype."""

    tensor: torch.Tensor
    dtype: torch.dtype = COMPACT_DTYPE


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
    if isinstance(value, Compact):
        key = str(len(tensors))
        tensors[key] = value.tensor.detach().to("cpu", value.dtype).contiguous()  # a cast is a copy
        return {"$compact": [key, str(value.tensor.dtype).removeprefix("torch.")]}
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
        if tag == "$compact":
            key, dtype = content
            if tensors[key].dtype not in COMPACT_STORED:
                raise ValueError(f"compact tensor {key} is stored as {tensors[key].dtype}, not a half type")
            return tensors[key].to(DTYPES[dtype])
        if tag == "$dtype":
            return DTYPES[content]
        if tag == "$tuple":
            return tuple(decode_state(item, tensors) for item in content)
        if tag == "$items":
            return {decode_state(key, tensors): decode_state(item, tensors) for key, item in content}
    return {key: decode_state(item, tensors) for key, item in value.items()}


def compact_state(state: dict[str, Any], dtype: torch.dtype = COMPACT_DTYPE) -> dict[str, Any]:
    """``state`` with its optimizer's per-parameter moment tensors marked :class:`Compact`.

    Scalars (AdamW's ``step``) stay exact. Only a torch optimizer's state dict can be
    compacted: a DeepSpeed ZeRO state (a list of partitions) holds the fp32 master weights.
    """
    optimizer = state["optimizer"]
    if not (isinstance(optimizer, dict) and isinstance(optimizer.get("state"), dict)):
        raise ConfigError(COMPACT_NEEDS_TORCH_OPTIMIZER)
    moments = {
        index: {name: Compact(value, dtype) if is_moment(value) else value for name, value in per_param.items()}
        for index, per_param in optimizer["state"].items()
    }
    return {**state, "optimizer": {**optimizer, "state": moments}}


def is_moment(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel() > 1


def write_trainer_state(folder: Path, state: dict[str, Any]) -> None:
    """``state`` into ``folder/trainer_state.json`` and ``folder/trainer_state.safetensors``."""
    tensors: dict[str, torch.Tensor] = {}
    tree = encode_state(state, tensors)
    save_file(tensors, str(folder / TRAINER_TENSORS))
    (folder / TRAINER_STATE).write_text(json.dumps({"format": STATE_FORMAT, "state": tree}) + "\n")


def check_moment_shapes(optimizer_state: dict[str, Any], parameters: list[torch.Tensor], checkpoint: Path) -> None:
    """Refuse an optimizer state whose moments do not fit the parameters (files of two runs mixed).

    torch's ``load_state_dict`` checks only the parameter counts; a wrong shape would fail
    at the first step, far from its cause.
    """
    per_param = optimizer_state.get("state", {})
    for index, values in per_param.items():
        if not isinstance(index, int) or not 0 <= index < len(parameters):
            raise ConfigError(f"The optimizer state in {checkpoint} names parameter {index!r}, and the components "
                              f"have {len(parameters)}: it belongs to another run. Start a new run, or "
                              f"--init-from {checkpoint / COMPONENTS}.")
        for name, value in values.items():
            if is_moment(value) and value.shape != parameters[index].shape:
                raise ConfigError(
                    f"The optimizer state in {checkpoint} does not match its components: {name} of parameter "
                    f"{index} is {tuple(value.shape)}, the parameter {tuple(parameters[index].shape)}. The folder "
                    f"mixes files of different runs; start a new run, or --init-from {checkpoint / COMPONENTS}."
                )


def data_fingerprint(*tensors: torch.Tensor) -> str:
    """A sha256 of the tensors' shapes and values: which sequences a data position points into."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(repr(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def portable_path(path: str | os.PathLike) -> str:
    """``path`` as a run records it: relative to the current folder when inside it (a clone's root
    elsewhere holds the file at the same relative path), else as given."""
    path = Path(path)
    if not path.is_absolute():
        return str(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


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
