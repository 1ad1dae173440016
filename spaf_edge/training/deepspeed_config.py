"""DeepSpeed JSON configs for ``spaf-edge train --deepspeed``: read, validate, fill ``"auto"``.

The trainer owns the optimizer (AdamW on the SpAF modules), its learning-rate schedule,
the batch geometry and the precision; a DeepSpeed config adds how ZeRO partitions and
offloads. So the keys below may be ``"auto"`` (filled from the CLI settings) or hold
the same value the settings give; any other value is an error that names the fix.

| key | filled from |
| --- | --- |
| ``train_micro_batch_size_per_gpu`` | ``--batch-size`` |
| ``gradient_accumulation_steps`` | ``--grad-accum`` |
| ``train_batch_size`` | batch size x grad accum x processes |
| ``gradient_clipping`` | ``--grad-clip`` |
| ``bf16.enabled``, ``fp16.enabled`` | ``--mixed-precision`` |
| ``zero_optimization.reduce_bucket_size`` | ``H * H`` (H: the base's hidden size) |
| ``zero_optimization.stage3_prefetch_bucket_size`` | ``0.9 * H * H`` |
| ``zero_optimization.stage3_param_persistence_threshold`` | ``10 * H`` |

``optimizer`` and ``scheduler`` sections are refused: the trainer's own AdamW and
schedule are used. ``zero_force_ds_cpu_optimizer`` defaults to ``false``, so optimizer
offload keeps torch's AdamW (on the CPU copies) instead of swapping in DeepSpeedCPUAdam,
whose C++ op is compiled on first use; set it to ``true`` where that build works.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

from spaf_edge.core.errors import ConfigError

AUTO = "auto"
PRECISIONS = ("no", "bf16", "fp16")
SHIPPED = "configs/deepspeed/zero2.json"
# Keys filled from the hidden size H of the base model (DeepSpeed's usual heuristics).
HIDDEN_SIZE_KEYS = {
    "reduce_bucket_size": lambda h: h * h,
    "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
    "stage3_param_persistence_threshold": lambda h: 10 * h,
}


def read_deepspeed_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read a DeepSpeed JSON file; a clear error when it is missing or not a JSON object."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"DeepSpeed config not found: {path}. Pass --deepspeed PATH to a JSON file, "
            f"e.g. the shipped {SHIPPED}."
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON ({exc}); fix the file.") from exc
    if not isinstance(config, dict):
        raise ConfigError(f"DeepSpeed config {path} must hold a JSON object, got {type(config).__name__}.")
    return config


def config_precision(config: dict[str, Any]) -> str | None:
    """The precision a config switches on explicitly (``true``), or None."""
    enabled = [name for name in ("bf16", "fp16") if _section(config, name).get("enabled") is True]
    if len(enabled) > 1:
        raise ConfigError("The DeepSpeed config enables both bf16 and fp16; enable one (or set both to \"auto\").")
    return enabled[0] if enabled else None


def resolve_precision(requested: str | None, config: dict[str, Any] | None) -> str:
    """``--mixed-precision`` if given, else the config's explicit choice, else accelerate launch's, else ``no``."""
    explicit = config_precision(config) if config is not None else None
    if requested is not None and requested not in PRECISIONS:
        raise ConfigError(f"Invalid mixed precision {requested!r}: expected one of {', '.join(PRECISIONS)}.")
    if requested is not None and explicit is not None and requested != explicit:
        raise ConfigError(
            f"--mixed-precision {requested} conflicts with the DeepSpeed config, which enables {explicit}. "
            f"Set \"{explicit}\": {{\"enabled\": \"auto\"}} in the config, or pass --mixed-precision {explicit}."
        )
    chosen = requested or explicit or os.environ.get("ACCELERATE_MIXED_PRECISION") or "no"
    if chosen not in PRECISIONS:
        raise ConfigError(f"Unsupported mixed precision {chosen!r}: expected one of {', '.join(PRECISIONS)}.")
    return chosen


def fill_deepspeed_config(
    config: dict[str, Any],
    batch_size: int,
    grad_accum: int,
    grad_clip: float,
    mixed_precision: str,
    world_size: int,
    hidden_size: int | None = None,
) -> dict[str, Any]:
    """A validated copy of ``config`` with every ``"auto"`` replaced by the run's value."""
    config = copy.deepcopy(config)
    for section in ("optimizer", "scheduler"):
        if section in config:
            raise ConfigError(
                f"The DeepSpeed config has a '{section}' section, but spaf-edge builds its own AdamW and "
                "learning-rate schedule (--lr, --warmup, --weight-decay). Remove that section."
            )
    zero = config.get("zero_optimization")
    if not isinstance(zero, dict) or zero.get("stage") not in (1, 2, 3):
        raise ConfigError(
            "The DeepSpeed config needs \"zero_optimization\": {\"stage\": 1, 2 or 3}. Without ZeRO, run plain "
            f"data parallelism instead (torchrun / accelerate launch without --deepspeed), or start from {SHIPPED}."
        )
    _match(config, "train_micro_batch_size_per_gpu", batch_size, "--batch-size")
    _match(config, "gradient_accumulation_steps", grad_accum, "--grad-accum")
    _match(config, "train_batch_size", batch_size * grad_accum * world_size,
           f"--batch-size x --grad-accum x {world_size} processes")
    _match(config, "gradient_clipping", float(grad_clip), "--grad-clip")
    config_precision(config)  # refuses bf16 and fp16 both on
    for name in ("bf16", "fp16"):
        section = config.setdefault(name, {})
        if not isinstance(section, dict):
            raise ConfigError(f"DeepSpeed config key '{name}' must be an object like {{\"enabled\": \"auto\"}}.")
        section["enabled"] = mixed_precision == name  # resolve_precision already refused a conflict
    for key, rule in HIDDEN_SIZE_KEYS.items():
        if zero.get(key) == AUTO and hidden_size is not None:
            zero[key] = rule(hidden_size)
    config.setdefault("zero_force_ds_cpu_optimizer", False)
    config.setdefault("zero_allow_untested_optimizer", True)
    left = sorted(_auto_keys(config))
    if left:
        raise ConfigError(
            f"spaf-edge cannot fill these \"auto\" values of the DeepSpeed config: {', '.join(left)}. "
            "Replace them with numbers."
        )
    validate_zero_section(zero)
    return config


def validate_zero_section(zero: dict[str, Any]) -> None:
    """Check ``zero_optimization`` with DeepSpeed's own schema (when DeepSpeed is installed)."""
    try:
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    except ImportError:
        return
    from pydantic import ValidationError

    try:
        DeepSpeedZeroConfig(**zero)
    except (ValidationError, TypeError, ValueError) as exc:
        raise ConfigError(f"Invalid zero_optimization section in the DeepSpeed config: {exc}") from exc


def _section(config: dict[str, Any], name: str) -> dict[str, Any]:
    value = config.get(name, {})
    return value if isinstance(value, dict) else {}


def _match(config: dict[str, Any], key: str, value: Any, source: str) -> None:
    current = config.get(key, AUTO)
    if current == AUTO:
        config[key] = value
    elif current != value:
        raise ConfigError(
            f"DeepSpeed config sets {key}={current!r}, but the run's settings give {value!r} ({source}). "
            f"Set \"{key}\": \"auto\" in the config, or change {source} to match."
        )


def _auto_keys(value: Any, prefix: str = "") -> list[str]:
    if isinstance(value, dict):
        return [key for name, item in value.items() for key in _auto_keys(item, f"{prefix}{name}.")]
    return [prefix.rstrip(".")] if value == AUTO else []
