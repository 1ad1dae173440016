"""Frozen-base features for training, computed per batch or cached on disk.

Per batch the trainer needs the cutoff state ``h`` of every exit layer and the
base's final (post-norm) hidden state, from which the teacher logits ``p`` follow
through the shared LM head, plus the states a ``layer_fusion`` adapter fuses into the
top state. One no-grad base forward gives them all.

Feature cache (optional). The base is frozen, so these features are the same every
epoch. :func:`build_feature_cache` stores them once in fp16 (``.npy`` memory maps,
[N, S, H] per exit and fused layer plus the final state), keyed by the base fingerprint,
the exits, the fused layers and a hash of the token data; :class:`CachedFeatureDataset` serves them with the
token tensors. fp16 rounding changes the teacher logits by ~1e-3, far below what
the drafters learn. Cost: ``N * S * H * 2 bytes`` per stored state.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from spaf_edge.core.atomic import atomic_directory
from spaf_edge.core.errors import ConfigError
from spaf_edge.core.progress import progress_bar
from spaf_edge.model import SpAFModel
from spaf_edge.training.data import TokenDataset

CACHE_META = "feature_cache.json"
FINAL = "final"


@dataclass
class BaseFeatures:
    cutoff: dict[int, torch.Tensor]  # exit layer k -> h: [B, S, H]
    final: torch.Tensor  # post-norm last hidden state: [B, S, H]; teacher logits = lm_head(final)
    layers: dict[int, torch.Tensor]  # layer m -> the state after it, for fusing adapters: [B, S, H]


def compute_base_features(
    model: SpAFModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> BaseFeatures:
    """One no-grad base forward. input_ids: [B, S] -> cutoff states, final state, fused layers' states."""
    hidden_states = model.base_features(input_ids, attention_mask)
    # hidden_states[k] is the state after layer k-1; the last entry is after the final norm.
    return BaseFeatures({k: hidden_states[k] for k in model.config.adapter_layers}, hidden_states[-1],
                        {m: hidden_states[m] for m in fused_layers(model)})


def fused_layers(model: SpAFModel) -> list[int]:
    """Every layer whose state some exit's adapter fuses into its top state."""
    return sorted({m for k in model.config.adapter_layers for m in model.fused_layers(k)})


def previous_top_states(final: torch.Tensor) -> torch.Tensor:
    """The exact top state of the position before each one, zeros at position 0 (as at the
    start of generation): what a top-aware adapter reads for a first draft. [B, S, H] -> [B, S, H]"""
    return torch.nn.functional.pad(final[:, :-1], (0, 0, 1, 0))


def previous_exact_tops(model: SpAFModel, features: BaseFeatures, exit_layer: int) -> torch.Tensor:
    """:func:`previous_top_states` of what the exit's adapter reads for a verified position
    (:meth:`SpAFModel.exact_top`: a fusing kind's fusion, with gradients into it). [B, S, H]"""
    return previous_top_states(model.exact_top(features.final, features.layers, exit_layer))


def batch_features(model: SpAFModel, batch: dict[str, torch.Tensor]) -> BaseFeatures:
    """Features from a cached batch when present, else from a base forward."""
    if FINAL in batch:
        dtype = next(model.base.parameters()).dtype
        cutoff = {k: batch[f"cutoff_{k}"].to(dtype) for k in model.config.adapter_layers}
        layers = {m: batch[f"layer_{m}"].to(dtype) for m in fused_layers(model)}
        return BaseFeatures(cutoff, batch[FINAL].to(dtype), layers)
    return compute_base_features(model, batch["input_ids"], batch["attention_mask"])


def cache_key(model: SpAFModel, dataset: TokenDataset) -> str:
    digest = hashlib.sha256()
    layers = fused_layers(model)  # absent when empty, so that older caches keep their keys
    digest.update(json.dumps([model.fingerprint, model.config.adapter_layers] + ([layers] if layers else [])).encode())
    for tensor in (dataset.input_ids, dataset.attention_mask):
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def build_feature_cache(
    model: SpAFModel, dataset: TokenDataset, folder: str | os.PathLike, batch_size: int = 8, progress: bool = True
) -> Path:
    """Write (or reuse) the fp16 features of ``dataset`` under ``folder/<key>``; return that folder."""
    key = cache_key(model, dataset)
    target = Path(folder) / key
    if (target / CACHE_META).is_file():
        return target
    count, length = dataset.input_ids.shape
    shape = (count, length, model.hidden_size)
    with atomic_directory(target) as tmp:
        arrays = {
            name: np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=np.float16, shape=shape)
            for name in feature_names(model.config.adapter_layers, fused_layers(model))
        }
        for start in progress_bar(range(0, count, batch_size), desc="caching base features", disable=not progress):
            rows = slice(start, min(count, start + batch_size))
            features = compute_base_features(model, dataset.input_ids[rows], dataset.attention_mask[rows])
            for k, hidden in features.cutoff.items():
                arrays[f"cutoff_{k}"][rows] = _to_fp16(hidden)
            arrays[FINAL][rows] = _to_fp16(features.final)
            for m, state in features.layers.items():
                arrays[f"layer_{m}"][rows] = _to_fp16(state)
        for array in arrays.values():
            array.flush()
        del arrays
        meta = {"key": key, "fingerprint": model.fingerprint, "exits": model.config.adapter_layers,
                "layers": fused_layers(model), "shape": shape}
        (tmp / CACHE_META).write_text(json.dumps(meta, indent=2) + "\n")
    return target


def feature_names(exits: list[int], layers: list[int]) -> list[str]:
    """The cached arrays: cutoff states per exit, the final state, fused layers' states."""
    return [f"cutoff_{k}" for k in exits] + [FINAL] + [f"layer_{m}" for m in layers]


def _to_fp16(hidden: torch.Tensor) -> np.ndarray:
    limit = torch.finfo(torch.float16).max
    return hidden.float().clamp(-limit, limit).to(torch.float16).cpu().numpy()


class CachedFeatureDataset(torch.utils.data.Dataset):
    """A :class:`TokenDataset` plus its cached features (read lazily from memory maps)."""

    def __init__(self, dataset: TokenDataset, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        meta_path = folder / CACHE_META
        if not meta_path.is_file():
            raise ConfigError(f"{folder} is not a feature cache (no {CACHE_META}); delete it and rebuild.")
        meta = json.loads(meta_path.read_text())
        if tuple(meta["shape"][:2]) != tuple(dataset.input_ids.shape):
            raise ConfigError(f"Feature cache {folder} does not match the dataset; delete it and rebuild.")
        self.dataset = dataset
        self.arrays = {
            name: np.load(folder / f"{name}.npy", mmap_mode="r")
            for name in feature_names(meta["exits"], meta.get("layers", []))
        }

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = self.dataset[index]
        for name, array in self.arrays.items():
            item[name] = torch.from_numpy(np.array(array[index]))  # [S, H] fp16
        return item
