"""How a training run is spread over processes: precision, the accelerator, cross-rank state.

Everything here goes through an existing engine: :class:`accelerate.Accelerator` for
torch.distributed DDP (gloo on CPU, nccl on GPU) and for DeepSpeed ZeRO (through
accelerate's ``DeepSpeedPlugin``). There is no home-made gradient exchange; the only
collectives issued here are bookkeeping: loss divisors, checkpoint gathers and the
end-of-run replica check.

Launchers. ``torchrun``, ``accelerate launch`` and the ``deepspeed`` launcher all set
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; a plain ``spaf-edge train --deepspeed`` (one
process, no launcher) gets those set to a one-process world here.
"""

from __future__ import annotations

import copy
import os
import socket
from dataclasses import dataclass
from typing import Any

import torch

from spaf_edge.core.errors import ConfigError
from spaf_edge.training import deepspeed_config as dsc

BASE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class DistributedSettings:
    """How to run (not what to learn): none of these is saved with the run's settings."""

    mixed_precision: str | None = None  # no | bf16 | fp16; None: the DeepSpeed config's, accelerate's, else no
    base_dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (auto: the mixed precision's on GPU, else fp32)
    deepspeed: str | None = None  # DeepSpeed JSON config

    def config_path(self) -> str | None:
        """``--deepspeed``, else the file ``accelerate launch --deepspeed_config_file`` names."""
        if self.deepspeed:
            return self.deepspeed
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
            path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
            if path != "none":
                return path
            raise ConfigError(
                "accelerate launch asks for DeepSpeed without a config file. Pass --deepspeed PATH "
                f"(e.g. {dsc.SHIPPED}) or --deepspeed_config_file to accelerate launch."
            )
        return None

    def read_config(self) -> dict[str, Any] | None:
        path = self.config_path()
        return dsc.read_deepspeed_config(path) if path else None

    def precision(self) -> str:
        return dsc.resolve_precision(self.mixed_precision, self.read_config())

    def torch_base_dtype(self, cuda: bool | None = None) -> torch.dtype:
        """The frozen base's dtype, checked against the precision of the SpAF modules."""
        cuda = torch.cuda.is_available() if cuda is None else cuda
        precision = self.precision()
        if self.base_dtype == "auto":
            return PRECISION_DTYPES.get(precision, torch.float32) if cuda else torch.float32
        if self.base_dtype not in BASE_DTYPES:
            raise ConfigError(
                f"Invalid --base-dtype {self.base_dtype!r}: expected auto or one of {', '.join(BASE_DTYPES)}."
            )
        dtype = BASE_DTYPES[self.base_dtype]
        check_precision_pair(dtype, precision, self.config_path() is not None)
        return dtype


def check_precision_pair(base_dtype: torch.dtype, precision: str, deepspeed: bool) -> None:
    """Refuse base/SpAF dtype pairs that cannot run together."""
    if base_dtype != torch.float32 and precision == "no":
        raise ConfigError(
            f"A {base_dtype} base needs mixed precision: the SpAF modules keep fp32 weights and run under "
            f"autocast. Pass --mixed-precision {'bf16' if base_dtype == torch.bfloat16 else 'fp16'}, "
            "or --base-dtype float32."
        )
    if deepspeed and precision != "no" and base_dtype != PRECISION_DTYPES[precision]:
        raise ConfigError(
            f"DeepSpeed {precision} runs the SpAF modules in {PRECISION_DTYPES[precision]} (fp32 master weights in "
            f"the optimizer), so the base must match: pass --base-dtype auto, not {base_dtype}."
        )


def launcher_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def ensure_launcher_env() -> None:
    """Give a launcher-less process a one-process world (DeepSpeed needs RANK etc.)."""
    if "LOCAL_RANK" in os.environ or "RANK" in os.environ:
        return
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"})
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(probe.getsockname()[1])


def end_process_group() -> None:
    """Destroy this process's torch.distributed group, if training started one.

    Call it once a launched command is done with its collectives. A Gloo group left for
    interpreter teardown can abort the process ("terminate called without an active
    exception", SIGABRT) after the run has succeeded: its worker threads outlive the
    interpreter (pytorch/pytorch#190489).
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def make_accelerator(settings: Any, distributed: DistributedSettings, hidden_size: int, find_unused: bool):
    """An Accelerator for ``settings`` (TrainSettings): DDP, or DeepSpeed when a config is given."""
    from accelerate import Accelerator
    from accelerate.utils import (
        DistributedDataParallelKwargs,
        GradientAccumulationPlugin,
        InitProcessGroupKwargs,
    )

    cuda = torch.cuda.is_available()
    handlers: list[Any] = [DistributedDataParallelKwargs(find_unused_parameters=find_unused)]
    precision = distributed.precision()
    config = distributed.read_config()
    plugin = None
    if config is not None:
        plugin = deepspeed_plugin(config, settings, precision, hidden_size)
        if not cuda:
            # accelerate assumes a GPU backend for DeepSpeed; on CPU name gloo explicitly.
            handlers.append(InitProcessGroupKwargs(backend="gloo"))
    accelerator = Accelerator(
        cpu=not cuda and plugin is None,  # on a CPU-only host, launched processes form a gloo group
        mixed_precision=precision,
        deepspeed_plugin=plugin,
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=settings.grad_accum,
                                                                sync_with_dataloader=False),
        kwargs_handlers=handlers,
    )
    if plugin is not None and accelerator.num_processes != launcher_world_size():
        raise ConfigError(
            f"DeepSpeed sees {accelerator.num_processes} processes but WORLD_SIZE is {launcher_world_size()}; "
            "launch with torchrun, accelerate launch or deepspeed so that both agree."
        )
    return accelerator


def deepspeed_plugin(config: dict[str, Any], settings: Any, precision: str, hidden_size: int):
    try:
        import deepspeed  # noqa: F401
        from accelerate.utils import DeepSpeedPlugin
    except ImportError as exc:
        raise ConfigError(
            "--deepspeed needs DeepSpeed: pip install 'spaf-edge[distributed]' (see docs/training.md)."
        ) from exc
    ensure_launcher_env()
    filled = dsc.fill_deepspeed_config(config, settings.batch_size, settings.grad_accum, settings.grad_clip,
                                       precision, launcher_world_size(), hidden_size)
    return DeepSpeedPlugin(hf_ds_config=filled)


def uses_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def zero_stage(accelerator) -> int:
    return accelerator.state.deepspeed_plugin.zero_stage if uses_deepspeed(accelerator) else 0


def count_normalizer(accelerator):
    """Local counts -> divisors ``global count / ranks`` (None in one process); see losses.py."""
    if accelerator.num_processes == 1:
        return None
    ranks = accelerator.num_processes

    def normalize(counts: torch.Tensor) -> torch.Tensor:
        total = counts.detach().clone()
        torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM)
        return total.clamp(min=1) / ranks

    return normalize


def gather_to_main(accelerator, value: Any) -> list[Any] | None:
    """Every rank's ``value`` (picklable) as a list on the main process; None elsewhere."""
    if accelerator.num_processes == 1:
        return [value]
    gathered = [None] * accelerator.num_processes if accelerator.is_main_process else None
    torch.distributed.gather_object(value, gathered, dst=0)
    return gathered


def innermost_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer under accelerate's (and DeepSpeed's) wrappers: it holds the lr."""
    while hasattr(optimizer, "optimizer"):  # AcceleratedOptimizer -> (ZeRO optimizer ->) torch optimizer
        optimizer = optimizer.optimizer
    return optimizer


def optimizer_state(accelerator, optimizer) -> Any:
    """Collective under DeepSpeed (each rank holds a ZeRO partition): a list on the main process."""
    if uses_deepspeed(accelerator):
        from accelerate.utils import send_to_device

        # To the CPU first: unpickled on rank 0, CUDA tensors would land on the other ranks' GPUs.
        return gather_to_main(accelerator, plain_zero_state(send_to_device(optimizer.optimizer.state_dict(), "cpu")))
    return optimizer.state_dict()


def plain_zero_state(state: dict[str, Any]) -> dict[str, Any]:
    """A ZeRO optimizer's state dict with its Python objects made data, for the checkpoint's JSON.

    The loss scaler becomes its class name and attributes (:func:`load_optimizer_state` sets them
    on the running scaler); the parameter slice mappings, which only DeepSpeed's universal
    checkpoint conversion reads, are dropped.
    """
    from deepspeed.checkpoint.constants import LOSS_SCALER, PARAM_SLICE_MAPPINGS

    state = {key: value for key, value in state.items() if key != PARAM_SLICE_MAPPINGS}
    scaler = state.get(LOSS_SCALER)
    if scaler is not None:
        state[LOSS_SCALER] = {"class": type(scaler).__name__, "attributes": dict(vars(scaler))}
    return state


def restore_loss_scaler(saved: dict[str, Any], current: Any) -> Any:
    """A copy of the running loss scaler ``current`` with the attributes :func:`plain_zero_state` kept."""
    if saved["class"] != type(current).__name__:
        raise ConfigError(
            f"The checkpoint was written with DeepSpeed's {saved['class']} and this run uses "
            f"{type(current).__name__}. Resume with the same precision settings, or start a new run."
        )
    scaler = copy.copy(current)
    vars(scaler).update({name: value for name, value in saved["attributes"].items() if name in vars(current)})
    return scaler


def load_optimizer_state(accelerator, optimizer, saved: Any) -> None:
    sharded = isinstance(saved, list)
    if sharded != uses_deepspeed(accelerator):
        written, now = ("DeepSpeed ZeRO", "without") if sharded else ("plain data parallelism", "with")
        raise ConfigError(
            f"The checkpoint was written with {written}, and this run is {now} --deepspeed. Resume with the "
            "same launch setup (the optimizer state is stored differently), or start a new run."
        )
    if sharded:
        from deepspeed.checkpoint.constants import LOSS_SCALER

        zero = optimizer.optimizer
        saved = [dict(part, **{LOSS_SCALER: restore_loss_scaler(part[LOSS_SCALER], zero.loss_scaler)})
                 if isinstance(part.get(LOSS_SCALER), dict) else part for part in saved]
        zero.load_state_dict(saved, load_from_fp32_weights=True)
    else:
        optimizer.load_state_dict(saved)


def full_spaf_weights(accelerator, module, model) -> dict[str, torch.Tensor] | None:
    """Under DeepSpeed, the fp32 master weights of the SpAF modules (collective); None otherwise.

    DeepSpeed's bf16/fp16 runs keep the modules in half precision and the exact fp32
    copies in the (partitioned) optimizer; checkpoints store the fp32 copies.
    """
    if not uses_deepspeed(accelerator):
        return None
    from deepspeed.utils import safe_get_full_fp32_param

    masters = {}
    for name, param in accelerator.unwrap_model(module).named_parameters():
        full = safe_get_full_fp32_param(param)
        masters[name] = (full if full is not None else param).detach().float().cpu()
    if not accelerator.is_main_process:
        return None
    weights = model.spaf_state_dict()
    weights.update(masters)
    return weights


def replica_max_diff(accelerator, parameters: list[torch.nn.Parameter]) -> float | None:
    """Largest difference between any rank's SpAF weights and rank 0's (None: one process or ZeRO-3)."""
    if accelerator.num_processes == 1 or zero_stage(accelerator) == 3:
        return None
    flat = torch.cat([param.detach().float().flatten() for param in parameters])
    reference = flat.clone()
    torch.distributed.broadcast(reference, src=0)
    diff = (flat - reference).abs().max()
    torch.distributed.all_reduce(diff, op=torch.distributed.ReduceOp.MAX)
    return float(diff)
