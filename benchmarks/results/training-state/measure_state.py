"""Measure the exact and the compact trainer state (docs/training.md, "Training that survives machines").

    .venv/bin/python benchmarks/results/training-state/measure_state.py sizes  # the shipped default, 3 CPU steps
    .venv/bin/python benchmarks/results/training-state/measure_state.py drift  # a tiny random Llama

``sizes``: 3 real optimizer steps of the shipped components (models/smollm2-135m-instruct, its
config) on the embedded base, on 24 rows of its distilled replies, 2 x 128 tokens per step; then
the checkpoint's bytes written exact and compact (bf16 and fp16 moments), and how far the next
AdamW update moves when it reads the rounded moments instead of the exact ones.

``drift``: a tiny random Llama (hidden 64, 4 layers, a character tokenizer) trained 200 steps on
the distilled replies without a break, and the same run stopped after its step-100 checkpoint
and resumed to 200 from that checkpoint rewritten in each form. Reported: the weights' and the
losses' distance from the uninterrupted run.

Results go to this folder as JSON (``sizes.json``, ``drift.json``).
"""

from __future__ import annotations

import gzip
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[3]
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from spaf_edge.core.config import SpAFConfig  # noqa: E402
from spaf_edge.model import SpAFModel  # noqa: E402
from spaf_edge.training import checkpoint as ckpt  # noqa: E402
from spaf_edge.training.trainer import TrainSettings, train, train_run  # noqa: E402

REPLIES = REPO / "models" / "smollm2-135m-instruct" / "distilled_replies.jsonl"
COMPONENTS = REPO / "models" / "smollm2-135m-instruct"
VARIANTS = {  # name: (moment dtype or None = exact, components dtype for a round trip or None)
    "exact": (None, None),
    "moments_bf16": (torch.bfloat16, None),
    "moments_fp16": (torch.float16, None),
    "components_fp16_moments_bf16": (torch.bfloat16, torch.float16),
}


def write_variant(checkpoint: Path, moments: torch.dtype | None, components: torch.dtype | None) -> None:
    """Rewrite ``checkpoint`` in place: moments stored in ``moments``, weights rounded through ``components``."""
    state = ckpt.load_trainer_state(checkpoint)
    if moments is not None:
        state = ckpt.compact_state(state, moments)
    ckpt.write_trainer_state(checkpoint, state)
    if components is not None:
        weights_file = checkpoint / ckpt.COMPONENTS / "spaf_components.safetensors"
        weights = load_file(str(weights_file))
        rounded = {k: v.to(components).float() if v.is_floating_point() else v for k, v in weights.items()}
        save_file(rounded, str(weights_file))


def folder_bytes(folder: Path) -> dict[str, int]:
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    gz = sum(len(gzip.compress(p.read_bytes(), 6)) for p in folder.rglob("*") if p.is_file())
    return {"files": files, "total": sum(files.values()), "total_gzip6": gz}


def update_error(state: dict, compact: dict, settings: TrainSettings) -> dict[str, float]:
    """How the next AdamW step's update ``m_hat / (sqrt(v_hat) + eps)`` changes with rounded moments."""
    group = state["optimizer"]["param_groups"][0]
    beta1, beta2 = group["betas"]
    eps = group["eps"]
    exact_updates, rounded_updates, zeros, nonzero = [], [], 0, 0
    for index, values in state["optimizer"]["state"].items():
        step = float(values["step"]) + 1
        rounded = compact["optimizer"]["state"][index]
        for source, out in ((values, exact_updates), (rounded, rounded_updates)):
            m = source["exp_avg"].float() * beta1 / (1 - beta1 ** step)
            v = source["exp_avg_sq"].float() * beta2 / (1 - beta2 ** step)
            out.append((m / (v.sqrt() + eps)).flatten())
        exact_v = values["exp_avg_sq"]
        zeros += int(((rounded["exp_avg_sq"].float() == 0) & (exact_v != 0)).sum())
        nonzero += int((exact_v != 0).sum())
    exact, rounded = torch.cat(exact_updates), torch.cat(rounded_updates)
    return {
        "update_relative_l2_error": float((rounded - exact).norm() / exact.norm()),
        "update_max_abs_error_over_max_abs": float((rounded - exact).abs().max() / exact.abs().max()),
        "exp_avg_sq_flushed_to_zero": zeros / max(nonzero, 1),
    }


def rounded_moments(state: dict, dtype: torch.dtype) -> dict:
    per_param = {index: {name: value.to(dtype).float() if ckpt.is_moment(value) else value
                         for name, value in values.items()}
                 for index, values in state["optimizer"]["state"].items()}
    return {"optimizer": {"state": per_param}}


def measure_sizes(work: Path) -> dict:
    data = work / "replies24.jsonl"
    data.write_text("".join(REPLIES.read_text().splitlines(keepends=True)[:24]))
    overrides = dict(steps=3, batch_size=2, seq_len=128, warmup=1, lr=5e-4, eval_every=0, eval_fraction=0.0,
                     save_every=3, seed=0)
    torch.set_num_threads(2)
    train_run("default", data, work / "run", overrides, init_from=COMPONENTS, progress=False)
    exact = work / "run" / ckpt.CHECKPOINT
    state = ckpt.load_trainer_state(exact)
    settings = TrainSettings(**overrides)
    result = {"setup": "3 AdamW steps of the shipped components on the embedded base (CPU, fp32), "
                       "2 x 128 tokens per step, 24 distilled replies",
              "trainable_parameters": sum(p.numel() for p in load_file(
                  str(exact / ckpt.COMPONENTS / "spaf_components.safetensors")).values()
                  if p.is_floating_point()),
              "exact": folder_bytes(exact)}
    for name, dtype in (("moments_bf16", torch.bfloat16), ("moments_fp16", torch.float16)):
        folder = work / name
        shutil.copytree(exact, folder)
        write_variant(folder, dtype, None)
        result[name] = {**folder_bytes(folder), **update_error(state, rounded_moments(state, dtype), settings)}
    return result


def tiny_model(tokenizer) -> SpAFModel:
    from conftest import make_tiny_base

    base = make_tiny_base("llama", seed=0, hidden_size=64, intermediate_size=128, initializer_range=0.2,
                          max_position_embeddings=256, eos_token_id=tokenizer.eos_token_id)
    return SpAFModel(base, SpAFConfig(cutoff_layer=2, alignment_rollout_steps=2), tokenizer)


class Stop(Exception):
    pass


def run_interrupted(tokenizer, settings: TrainSettings, run_dir: Path, stop_at: int) -> None:
    original = ckpt.save_checkpoint

    def save_then_stop(run_dir, model, state, run_settings, **kwargs):
        path = original(run_dir, model, state, run_settings, **kwargs)
        if state["step"] == stop_at:
            raise Stop()
        return path

    ckpt.save_checkpoint = save_then_stop
    try:
        train(tiny_model(tokenizer), REPLIES, run_dir, settings, progress=False)
    except Stop:
        pass
    finally:
        ckpt.save_checkpoint = original


def train_losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return [row["total"] for row in rows if row["split"] == "train"]


def measure_drift(work: Path, steps: int = 200, stop_at: int = 100) -> dict:
    from conftest import make_tiny_tokenizer

    torch.set_num_threads(1)
    tokenizer = make_tiny_tokenizer()
    settings = dict(steps=steps, batch_size=4, seq_len=64, lr=3e-3, warmup=5, eval_every=0, eval_fraction=0.0,
                    save_every=stop_at, logit_chunk_rows=64)
    full = tiny_model(tokenizer)
    train(full, REPLIES, work / "full", TrainSettings(**settings), progress=False)
    reference = full.spaf_state_dict()
    run_interrupted(tokenizer, TrainSettings(**settings), work / "split", stop_at)
    at_stop = load_file(str(work / "split" / ckpt.CHECKPOINT / ckpt.COMPONENTS / "spaf_components.safetensors"))
    names = [k for k, v in reference.items() if v.is_floating_point()]
    moved = torch.cat([(reference[k] - at_stop[k]).flatten() for k in names]).norm()
    full_losses = train_losses(work / "full")
    result = {"setup": f"tiny random Llama (hidden 64, 4 layers), {steps} steps of 4 x 64 tokens, lr 3e-3, "
                       f"stopped after step {stop_at} and resumed", "weights_moved_after_stop_l2": float(moved),
              "variants": {}}
    for name, (moments, components) in VARIANTS.items():
        run_dir = work / name
        shutil.copytree(work / "split", run_dir)
        write_variant(run_dir / ckpt.CHECKPOINT, moments, components)
        state_bytes = (run_dir / ckpt.CHECKPOINT / ckpt.TRAINER_TENSORS).stat().st_size
        resumed = tiny_model(tokenizer)
        train(resumed, REPLIES, run_dir, TrainSettings(**settings), resume=True, progress=False)
        weights = resumed.spaf_state_dict()
        diff = torch.cat([(weights[k] - reference[k]).flatten() for k in names])
        losses = train_losses(run_dir)
        loss_diff = [abs(a - b) for a, b in zip(losses[stop_at:], full_losses[stop_at:])]
        result["variants"][name] = {
            "trainer_state_bytes": state_bytes,
            "weights_max_abs_diff": float(diff.abs().max()),
            "weights_l2_diff_over_l2_moved": float(diff.norm() / moved),
            "loss_max_abs_diff_after_resume": max(loss_diff),
            "final_loss": losses[-1], "final_loss_uninterrupted": full_losses[-1],
        }
    return result


def main() -> None:
    what = sys.argv[1] if len(sys.argv) > 1 else "drift"
    measure = {"sizes": measure_sizes, "drift": measure_drift}[what]
    with tempfile.TemporaryDirectory() as work:
        result = measure(Path(work))
    (HERE / f"{what}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
