"""Training checkpoints: SpAF components + optimizer/scheduler/step/RNG state, written atomically.

Layout of ``RUN_DIR/checkpoint`` (replaced in one rename by :func:`save_checkpoint`):
``components/`` (a SpAF components folder, loadable with ``--components``),
``trainer_state.pt`` (optimizer, scheduler, step, RNG states, world size) and ``settings.json``.
In a distributed run the main process writes it alone: ``optimizer`` is its state dict
(DDP replicas agree) or, under DeepSpeed ZeRO, the list of every rank's partition;
``rng_per_rank`` holds each rank's RNG states (``rng`` is rank 0's).
A crash while writing leaves the previous checkpoint in place.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spaf_edge.atomic import atomic_directory
from spaf_edge.errors import ModelNotFoundError
from spaf_edge.model import SpAFModel

CHECKPOINT = "checkpoint"
COMPONENTS = "components"
TRAINER_STATE = "trainer_state.pt"
SETTINGS = "settings.json"


def rng_state() -> dict[str, Any]:
    """This process's RNG states (with the current CUDA device's when there is one)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def write_trainer_state(path: Path, state: dict[str, Any]) -> None:
    torch.save(state, path)


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
        write_trainer_state(tmp / TRAINER_STATE, trainer_state)
        (tmp / SETTINGS).write_text(json.dumps(settings, indent=2) + "\n")
    return target


def find_checkpoint(run_dir: str | Path) -> Path | None:
    """The run's latest complete checkpoint, or None.

    Between its two renames, :func:`atomic_directory` parks the previous folder as
    ``.checkpoint.old-PID``; a crash exactly there leaves only that copy, so it is used.
    """
    run_dir = Path(run_dir)
    candidates = [run_dir / CHECKPOINT] + sorted(run_dir.glob(f".{CHECKPOINT}.old-*"))
    for candidate in candidates:
        if (candidate / TRAINER_STATE).is_file() and (candidate / SETTINGS).is_file():
            return candidate
    return None


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    try:
        # Our own file: it holds RNG states (Python objects), so weights_only is off.
        return torch.load(checkpoint / TRAINER_STATE, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as exc:
        raise ModelNotFoundError(
            f"Cannot read {checkpoint / TRAINER_STATE} ({exc}); the checkpoint is corrupt. "
            "Delete it and restart training without --resume."
        ) from exc


def load_checkpoint_settings(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / SETTINGS).read_text())
