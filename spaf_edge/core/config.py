"""SpAF configuration: one dataclass tree, JSON in and out, validated.

Torch-free so that the runtime and the exporter's manifest can use it.
Setting names follow DESIGN.md: ``cutoff_layer``, ``adapter_dim_ratio``,
``alignment_head.num_layers``, ``alignment_head.hidden_dim_ratio``,
``loss_weights.alignment``, ``loss_weights.adapter_base``, ``alignment_loss_type``,
``num_draft_tokens``, ``serial_parallel_transition``, ``temperature``, ``top_p``,
``top_k``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spaf_edge.core.atomic import atomic_write_text
from spaf_edge.core.errors import ConfigError

# ONNX Runtime thread pools of the engine's sessions (spaf_edge.runtime.session.session_options),
# here so the CLI can offer them without importing onnxruntime.
THREAD_POOLS = ("session", "global")
THREAD_POOL_ENV = "SPAF_EDGE_THREAD_POOL"  # the default when none is asked for (the CLI sets "global")

CONFIG_FILE = "spaf_config.json"
ALIGNMENT_LOSS_TYPES = ("mse", "cosine")
# Settings of the training loss alone: a run that starts from trained components may change them.
RECIPE_FIELDS = ("loss_weights", "alignment_loss_type", "alignment_rollout_steps", "alignment_rollout_decay",
                 "topk_distill_k")


@dataclass
class AlignmentHeadConfig:
    kind: str = "mlp"
    num_layers: int = 2
    hidden_dim_ratio: float = 2.0


@dataclass
class LossWeights:
    adapter_base: float = 1.0  # KL(p_t || q_t) of the adapter's drafts
    adapter_ce: float = 0.0  # optional cross-entropy on data tokens
    alignment: float = 1.0  # state loss between AH(e(x_{t+1}), h(t)) and h(t+1)
    alignment_token: float = 1.0  # KL(p_{t+1} || head(a(AH(...))))
    topk: float = 0.0  # -sum over the teacher's top-k tokens of p log q, every draft variant (training recipe)


@dataclass
class SpAFConfig:
    """Everything that defines SpAF components and their default decoding settings.

    ``cutoff_layer`` None means ``L // 2``; ``adapter_layers`` None means
    ``[cutoff_layer]``. :meth:`resolved` fills both for a given base depth.
    """

    cutoff_layer: int | None = None
    adapter_layers: list[int] | None = None
    adapter_kind: str = "bottleneck"
    adapter_dim_ratio: float = 0.25
    # layer_fusion adapters: states after these layers (cutoff < m < L; None: midway between the last exit and
    # the top) join the previous position's top state through rank-``fusion_rank`` projections
    fusion_layers: list[int] | None = None
    fusion_rank: int = 64
    alignment_head: AlignmentHeadConfig = field(default_factory=AlignmentHeadConfig)
    loss_weights: LossWeights = field(default_factory=LossWeights)
    alignment_loss_type: str = "mse"
    alignment_rollout_steps: int = 1  # AH steps rolled on its own outputs in training
    alignment_rollout_decay: float = 1.0  # rollout step r weighs decay**(r-1), normalised; 1.0 = plain mean
    topk_distill_k: int = 8  # k of the loss_weights.topk term
    draft_vocab_size: int | None = None  # restrict draft logits to the V_d most frequent tokens
    num_draft_tokens: int = 5
    serial_parallel_transition: int = 2
    draft_stop_threshold: float | None = None
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k filter

    # ---- construction -------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpAFConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"SpAF config must be a JSON object, got {type(data).__name__}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"Unknown SpAF config setting(s): {', '.join(unknown)}. "
                f"Valid settings: {', '.join(sorted(known))}."
            )
        values = dict(data)
        for name, nested in (("alignment_head", AlignmentHeadConfig), ("loss_weights", LossWeights)):
            if name not in values:
                continue
            if not isinstance(values[name], dict):
                raise ConfigError(f"Invalid {name}={values[name]!r}: expected an object of settings.")
            try:
                values[name] = nested(**values[name])
            except TypeError as exc:
                valid = ", ".join(f.name for f in dataclasses.fields(nested))
                raise ConfigError(f"Invalid {name} setting ({exc}). Valid {name} settings: {valid}.") from exc
        config = cls(**values)
        config.validate()
        return config

    @classmethod
    def load(cls, path: str | os.PathLike) -> SpAFConfig:
        path = Path(path)
        if path.is_dir():
            path = path / CONFIG_FILE
        if not path.is_file():
            raise ConfigError(f"SpAF config not found: {path}. Pass a {CONFIG_FILE} file or a checkpoint folder.")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path} is not valid JSON ({exc}). Fix or regenerate the file.") from exc
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        if path.is_dir() or path.suffix != ".json":
            path = path / CONFIG_FILE
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def replace(self, **changes: Any) -> SpAFConfig:
        config = dataclasses.replace(self, **changes)
        config.validate()
        return config

    def with_recipe(self, rollout_steps: int | None = None, rollout_decay: float | None = None,
                    topk_weight: float | None = None, topk_k: int | None = None) -> SpAFConfig:
        """This config with the given loss-recipe options (``spaf-edge train``'s); None keeps a setting."""
        changes = {"alignment_rollout_steps": rollout_steps, "alignment_rollout_decay": rollout_decay,
                   "topk_distill_k": topk_k}
        if topk_weight is not None:
            changes["loss_weights"] = dataclasses.replace(self.loss_weights, topk=topk_weight)
        return self.replace(**{k: v for k, v in changes.items() if v is not None})

    def differs_beyond_recipe(self, other: SpAFConfig) -> list[str]:
        """The settings other than :data:`RECIPE_FIELDS` in which ``other`` differs from this config."""
        mine, theirs = self.to_dict(), other.to_dict()
        return sorted(name for name in mine if name not in RECIPE_FIELDS and mine[name] != theirs[name])

    def resolved(self, num_layers: int) -> SpAFConfig:
        """Fill defaults that depend on the base model depth and validate against it."""
        self.validate(num_layers)
        cutoff = self.cutoff_layer if self.cutoff_layer is not None else num_layers // 2
        layers = list(self.adapter_layers) if self.adapter_layers else [cutoff]
        if cutoff not in layers:
            layers.append(cutoff)
        fusion = sorted(set(self.fusion_layers)) if self.fusion_layers else None
        config = dataclasses.replace(self, cutoff_layer=cutoff, adapter_layers=sorted(set(layers)),
                                     fusion_layers=fusion)
        config.validate(num_layers)
        return config

    def fused_layers(self, num_layers: int) -> list[int]:
        """The layers a ``layer_fusion`` adapter reads: ``fusion_layers``, else the one midway between
        the last exit and the top. Call on a resolved config."""
        if self.fusion_layers:
            return list(self.fusion_layers)
        last = max(self.adapter_layers or [self.cutoff_layer])
        layer = (last + num_layers) // 2
        _check(layer > last, "fusion_layers", None,
               f"a layer above the last exit ({last}); none lies below the top ({num_layers} layers)")
        return [layer]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    # ---- validation ---------------------------------------------------
    def validate(self, num_layers: int | None = None) -> None:
        """Raise :class:`ConfigError` naming the first invalid setting and its valid range."""
        validate_sampling(self.temperature, self.top_p, self.top_k)
        validate_drafting(self.num_draft_tokens, self.serial_parallel_transition, self.draft_stop_threshold)
        _check(
            _is_number(self.adapter_dim_ratio) and self.adapter_dim_ratio > 0,
            "adapter_dim_ratio", self.adapter_dim_ratio, "a number > 0",
        )
        _check(
            _is_int(self.alignment_head.num_layers) and self.alignment_head.num_layers >= 1,
            "alignment_head.num_layers", self.alignment_head.num_layers, "an integer >= 1",
        )
        _check(
            _is_number(self.alignment_head.hidden_dim_ratio) and self.alignment_head.hidden_dim_ratio > 0,
            "alignment_head.hidden_dim_ratio", self.alignment_head.hidden_dim_ratio, "a number > 0",
        )
        _check(
            self.alignment_loss_type in ALIGNMENT_LOSS_TYPES,
            "alignment_loss_type", self.alignment_loss_type, f"one of {ALIGNMENT_LOSS_TYPES}",
        )
        _check(
            _is_int(self.alignment_rollout_steps) and self.alignment_rollout_steps >= 1,
            "alignment_rollout_steps", self.alignment_rollout_steps, "an integer >= 1",
        )
        _check(
            _is_number(self.alignment_rollout_decay) and 0 < self.alignment_rollout_decay <= 1,
            "alignment_rollout_decay", self.alignment_rollout_decay,
            "a number in (0, 1]: rollout step r weighs decay**(r-1); 1 weighs every step alike",
        )
        _check(
            _is_int(self.topk_distill_k) and self.topk_distill_k >= 1,
            "topk_distill_k", self.topk_distill_k, "an integer >= 1 (the teacher's top tokens the topk loss reads)",
        )
        for name, value in dataclasses.asdict(self.loss_weights).items():
            _check(_is_number(value) and value >= 0, f"loss_weights.{name}", value, "a number >= 0")
        if self.draft_vocab_size is not None:
            _check(
                _is_int(self.draft_vocab_size) and self.draft_vocab_size >= 2,
                "draft_vocab_size", self.draft_vocab_size, "an integer >= 2 or null",
            )
        if self.adapter_layers is not None:
            _check(
                isinstance(self.adapter_layers, (list, tuple)) and all(_is_int(x) for x in self.adapter_layers),
                "adapter_layers", self.adapter_layers, "a list of integer exit layers or null",
            )
        _check(_is_int(self.fusion_rank) and self.fusion_rank >= 1, "fusion_rank", self.fusion_rank, "an integer >= 1")
        if self.fusion_layers is not None:
            _check(
                isinstance(self.fusion_layers, (list, tuple)) and all(_is_int(x) for x in self.fusion_layers),
                "fusion_layers", self.fusion_layers, "a list of integer layers or null",
            )
        if num_layers is not None and self.fusion_layers:
            lowest = max([self.cutoff_layer or 0, *(self.adapter_layers or [])]) + 1
            for layer in self.fusion_layers:
                _check(
                    lowest <= layer <= num_layers - 1, "fusion_layers", self.fusion_layers,
                    f"layers in {lowest}..{num_layers - 1}: above every exit (the upper stack computes them) and "
                    f"below the top ({num_layers} layers)",
                )
        if num_layers is not None:
            upper = num_layers - 1
            for name, layer in [("cutoff_layer", self.cutoff_layer)] + [
                ("adapter_layers", layer) for layer in (self.adapter_layers or [])
            ]:
                if layer is None:
                    continue
                _check(
                    _is_int(layer) and 1 <= layer <= upper,
                    name, layer, f"an integer in 1..{upper} (the base model has {num_layers} layers)",
                )
        elif self.cutoff_layer is not None:
            _check(
                _is_int(self.cutoff_layer) and self.cutoff_layer >= 1,
                "cutoff_layer", self.cutoff_layer, "an integer >= 1",
            )


def validate_sampling(temperature: float, top_p: float, top_k: int) -> None:
    _check(_is_number(temperature) and 0 <= temperature < math.inf, "temperature", temperature,
           "a finite number >= 0 (0 = greedy)")
    _check(_is_number(top_p) and 0 < top_p <= 1, "top_p", top_p, "a number in (0, 1]")
    _check(_is_int(top_k) and top_k >= 0, "top_k", top_k, "an integer >= 0 (0 = off)")


def validate_drafting(num_draft_tokens: int, serial_parallel_transition: int, stop_threshold: float | None) -> None:
    _check(
        _is_int(num_draft_tokens) and num_draft_tokens >= 1,
        "num_draft_tokens", num_draft_tokens, "an integer >= 1",
    )
    _check(
        _is_int(serial_parallel_transition) and 0 <= serial_parallel_transition <= num_draft_tokens,
        "serial_parallel_transition", serial_parallel_transition,
        f"an integer with 0 <= serial_parallel_transition <= num_draft_tokens ({num_draft_tokens})",
    )
    if stop_threshold is not None:
        _check(
            _is_number(stop_threshold) and 0 <= stop_threshold < 1,
            "draft_stop_threshold", stop_threshold, "a number in [0, 1) or null",
        )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(ok: bool, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"Invalid {name}={value!r}: expected {expected}.")

