"""Distributed training: torchrun/DDP (gloo) and DeepSpeed ZeRO-2 on CPU, against one process.

The reference for a run of R processes with ``--batch-size b --grad-accum A`` is one
process with batch ``R * A * b`` (docs/training.md, "Equivalence"): the same sequences
per optimizer step, the same global masked-mean loss, so the same weights up to fp32
rounding. The control with batch ``A * b`` shows that the comparison can fail: a run
whose ranks all saw the same shard would land there, not on the reference.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import make_tiny_base, make_tiny_tokenizer, write_text_data
from safetensors.torch import load_file

from spaf_edge.cli import main
from spaf_edge.core.config import SpAFConfig
from spaf_edge.core.errors import ConfigError
from spaf_edge.model import WEIGHTS_FILE, SpAFModel
from spaf_edge.training import checkpoint as ckpt
from spaf_edge.training import deepspeed_config as dsc
from spaf_edge.training.distributed import DistributedSettings
from spaf_edge.training.trainer import LossModule, TrainSettings, train, train_run

pytestmark = pytest.mark.usefixtures("single_thread")

REPO = Path(__file__).resolve().parents[1]
ZERO2 = REPO / "configs" / "deepspeed" / "zero2.json"
RANKS, BATCH, ACCUM = 2, 2, 2
# Constant lr (no warmup, no decay), so that a run resumed with more --steps follows the
# same schedule as one that ran all steps at once.
SETTINGS = dict(seq_len=32, lr=1e-2, warmup=0, min_lr_ratio=1.0, save_every=2, eval_every=2, logit_chunk_rows=40)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random Llama folder (peaked distributions: init range 0.2) and text data."""
    root = tmp_path_factory.mktemp("dist")
    tokenizer = make_tiny_tokenizer()
    base = make_tiny_base("llama", initializer_range=0.2, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
    base.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    write_text_data(root / "data.jsonl")
    return root


@pytest.fixture(scope="module")
def reference(setup):
    """One-process runs (in this process), cached by (batch size, steps): their final weights and log."""
    runs = {}

    def get(batch_size, steps):
        if (batch_size, steps) not in runs:
            run_dir = setup / f"ref_b{batch_size}_s{steps}"
            train_run(setup / "model", setup / "data.jsonl", run_dir,
                      dict(SETTINGS, steps=steps, batch_size=batch_size), SpAFConfig(cutoff_layer=2), progress=False)
            runs[batch_size, steps] = (weights(run_dir / "final"), train_rows(run_dir))
        return runs[batch_size, steps]

    return get


def weights(folder):
    return load_file(str(folder / WEIGHTS_FILE))


def train_rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return [row for row in rows if row["split"] == "train"]


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[name] - b[name]).abs().max()) for name in a)


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun_train(setup, run_dir, *args):
    """``torchrun --nproc_per_node 2 -m spaf_edge train ...``; returns the completed process."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(RANKS),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "spaf_edge", "train",
               "--base-model", str(setup / "model"), "--out", str(run_dir), "--no-progress", *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def fresh_args(setup, steps):
    options = dict(SETTINGS, steps=steps, batch_size=BATCH, grad_accum=ACCUM)
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in options.items()]
    return ["--data", setup / "data.jsonl", "--cutoff-layer", 2, *flags]


def summary(stdout):
    assert stdout.count('"final"') == 1, "the summary must be printed once (by rank 0)"
    return json.loads(stdout[stdout.index("{"):])


def check_run_folder(run_dir, steps):
    """Rank 0 wrote everything once: no partial or duplicate files, each step logged once."""
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint", "final", "settings.json", "train_log.jsonl"]
    assert not [p for p in run_dir.rglob(".*")], "a partial or parked folder was left behind"
    assert sorted(p.name for p in (run_dir / "checkpoint").iterdir()) == ["components", "settings.json",
                                                                         "trainer_state.json",
                                                                         "trainer_state.safetensors"]
    assert [row["step"] for row in train_rows(run_dir)] == list(range(1, steps + 1))
    rows = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    replicas = [row for row in rows if row["split"] == "replicas"]
    assert replicas and all(row["max_abs_diff"] == 0.0 for row in replicas), replicas  # both ranks identical
    state = ckpt.load_trainer_state(run_dir / "checkpoint")
    assert state["step"] == steps and state["world_size"] == RANKS and len(state["rng_per_rank"]) == RANKS
    return state


def check_against_reference(run_dir, reference, steps):
    expected, expected_rows = reference(RANKS * ACCUM * BATCH, steps)
    got = weights(run_dir / "final")
    assert max_diff(got, expected) < 2e-5
    got_losses = [row["total"] for row in train_rows(run_dir)]
    assert got_losses == pytest.approx([row["total"] for row in expected_rows], rel=1e-5)
    return got


def run_two_processes_and_resume(setup, reference, run_dir, *extra):
    """4 steps on 2 ranks, checked; then resumed to 6 steps, checked again."""
    result = torchrun_train(setup, run_dir, *fresh_args(setup, 4), *extra)
    assert summary(result.stdout)["replica_max_diff"] == 0.0
    state = check_run_folder(run_dir, 4)
    got = check_against_reference(run_dir, reference, 4)
    control, _ = reference(ACCUM * BATCH, 4)  # what a rank alone would have learned
    assert max_diff(got, control) > 1e-3
    # The checkpoint loads in one process and holds the same weights as final/.
    model = SpAFModel.from_pretrained(setup / "model", components=run_dir / "checkpoint" / "components")
    assert max_diff(model.spaf_state_dict(), got) == 0.0

    torchrun_train(setup, run_dir, "--resume", "--steps", 6, *extra)
    check_run_folder(run_dir, 6)
    check_against_reference(run_dir, reference, 6)
    return state


def test_torchrun_cli_matches_one_process_and_resumes(setup, reference, tmp_path):
    state = run_two_processes_and_resume(setup, reference, tmp_path / "run")
    assert isinstance(state["optimizer"], dict)  # DDP replicas share one optimizer state


def test_deepspeed_zero2_two_processes_matches_one_process(setup, reference, tmp_path):
    """ZeRO-2 with CPU optimizer offload, through accelerate's DeepSpeedPlugin, on gloo.

    ~25 s; on a machine's first DeepSpeed CPU run add ~1 min: DeepSpeed compiles its
    shared-memory communication op once (cached under ~/.cache/torch_extensions).
    """
    pytest.importorskip("deepspeed")
    if shutil.which("c++") is None:
        pytest.skip("DeepSpeed's CPU backend compiles a C++ op at start-up; no C++ compiler here")
    state = run_two_processes_and_resume(setup, reference, tmp_path / "run", "--deepspeed", ZERO2)
    assert isinstance(state["optimizer"], list) and len(state["optimizer"]) == RANKS  # one ZeRO partition per rank


# ---- one process ------------------------------------------------------------------
def test_only_spaf_parameters_are_wrapped_and_trained(setup, tmp_path):
    model = SpAFModel.from_pretrained(setup / "model", SpAFConfig(cutoff_layer=2))
    module = LossModule(model, chunk_rows=40)
    assert {id(p) for p in module.parameters()} == {id(p) for p in model.spaf_parameters()}
    assert not any(p.requires_grad for p in model.base.parameters())
    before = {name: p.clone() for name, p in model.base.named_parameters()}
    train(model, setup / "data.jsonl", tmp_path, TrainSettings(**dict(SETTINGS, steps=2, batch_size=4)),
          progress=False)
    assert all(p.grad is None for p in model.base.parameters())
    assert all(torch.equal(p, before[name]) for name, p in model.base.named_parameters())


def test_resume_refuses_another_number_of_processes(setup, tmp_path):
    settings = TrainSettings(**dict(SETTINGS, steps=2, batch_size=4))
    train(SpAFModel.from_pretrained(setup / "model", SpAFConfig(cutoff_layer=2)), setup / "data.jsonl", tmp_path,
          settings, progress=False)
    folder = tmp_path / ckpt.CHECKPOINT
    state = ckpt.load_trainer_state(folder)
    state["world_size"] = 2
    ckpt.write_trainer_state(folder, state)
    with pytest.raises(ConfigError, match="2 process"):
        train(SpAFModel.from_pretrained(setup / "model", SpAFConfig(cutoff_layer=2)), setup / "data.jsonl",
              tmp_path, settings, resume=True, progress=False)


def test_too_little_data_for_the_global_batch(setup, tmp_path):
    settings = TrainSettings(**dict(SETTINGS, steps=2, batch_size=4, grad_accum=50))
    with pytest.raises(ConfigError, match="global batch of 200"):
        train(SpAFModel.from_pretrained(setup / "model", SpAFConfig(cutoff_layer=2)), setup / "data.jsonl",
              tmp_path, settings, progress=False)


# ---- DeepSpeed config handling ------------------------------------------------------
def fill(config, precision="bf16", **changes):
    values = dict(batch_size=4, grad_accum=2, grad_clip=1.0, mixed_precision=precision, world_size=2, hidden_size=64)
    values.update(changes)
    return dsc.fill_deepspeed_config(config, **values)


def test_shipped_zero2_config_is_filled_from_the_settings():
    shipped = dsc.read_deepspeed_config(ZERO2)
    config = fill(shipped)
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert config["gradient_accumulation_steps"] == 2
    assert config["train_batch_size"] == 4 * 2 * 2
    assert config["gradient_clipping"] == 1.0
    assert config["bf16"]["enabled"] is True and config["fp16"]["enabled"] is False
    zero = config["zero_optimization"]
    assert zero["stage"] == 2 and zero["offload_optimizer"]["device"] == "cpu"
    assert zero["reduce_bucket_size"] == 64 * 64
    assert config["zero_force_ds_cpu_optimizer"] is False  # torch AdamW on the CPU copies: no op build
    assert "auto" not in json.dumps(config)
    assert shipped["train_batch_size"] == "auto"  # the file's dict is not modified
    fp16 = fill(shipped, "fp16")
    assert fp16["fp16"]["enabled"] is True and fp16["bf16"]["enabled"] is False
    assert fill(shipped, "no")["bf16"]["enabled"] is False


def test_shipped_zero3_config_is_filled_from_the_settings():
    zero = fill(dsc.read_deepspeed_config(ZERO2.with_name("zero3.json")))["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_param"]["device"] == "cpu"
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 64 * 64)
    assert zero["stage3_param_persistence_threshold"] == 10 * 64


def test_deepspeed_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found.*--deepspeed"):
        dsc.read_deepspeed_config(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"zero_optimization": {"stage": 2,}')
    with pytest.raises(ConfigError, match="not valid JSON"):
        dsc.read_deepspeed_config(broken)
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        dsc.read_deepspeed_config(listed)


@pytest.mark.parametrize("change, message", [
    ({"train_micro_batch_size_per_gpu": 8}, "train_micro_batch_size_per_gpu=8.*--batch-size"),
    ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps=4.*--grad-accum"),
    ({"train_batch_size": 7}, "train_batch_size=7"),
    ({"gradient_clipping": 0.5}, "gradient_clipping=0.5.*--grad-clip"),
    ({"optimizer": {"type": "AdamW"}}, "'optimizer' section"),
    ({"scheduler": {"type": "WarmupLR"}}, "'scheduler' section"),
    ({"zero_optimization": {"stage": 0}}, "stage"),
    ({"zero_optimization": {"stage": 2, "sub_group_size": "auto"}}, "zero_optimization.sub_group_size"),
    ({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, "both bf16 and fp16"),
])
def test_invalid_deepspeed_configs_name_the_fix(change, message):
    config = dict(dsc.read_deepspeed_config(ZERO2), **change)
    with pytest.raises(ConfigError, match=message):
        fill(config)


def test_explicit_matching_values_are_accepted():
    config = dict(dsc.read_deepspeed_config(ZERO2), train_micro_batch_size_per_gpu=4, gradient_clipping=1)
    assert fill(config)["train_micro_batch_size_per_gpu"] == 4


def test_zero_section_is_checked_by_deepspeed_schema():
    pytest.importorskip("deepspeed")
    config = dsc.read_deepspeed_config(ZERO2)
    config["zero_optimization"]["offload_optimizer"]["device"] = "gpu"
    with pytest.raises(ConfigError, match="zero_optimization"):
        fill(config)


def test_precision_comes_from_cli_then_config_then_accelerate(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    auto = dsc.read_deepspeed_config(ZERO2)
    explicit = dict(auto, bf16={"enabled": True})
    assert dsc.resolve_precision(None, None) == "no"
    assert dsc.resolve_precision(None, auto) == "no"
    assert dsc.resolve_precision(None, explicit) == "bf16"
    assert dsc.resolve_precision("fp16", auto) == "fp16"
    with pytest.raises(ConfigError, match="conflicts"):
        dsc.resolve_precision("fp16", explicit)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch --mixed_precision` sets
    assert dsc.resolve_precision(None, auto) == "bf16"


def test_base_dtype_follows_precision_and_refuses_bad_pairs(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert DistributedSettings().torch_base_dtype(cuda=False) == torch.float32
    assert DistributedSettings(mixed_precision="bf16").torch_base_dtype(cuda=False) == torch.float32  # CPU: fp32
    assert DistributedSettings(mixed_precision="bf16").torch_base_dtype(cuda=True) == torch.bfloat16
    assert DistributedSettings(mixed_precision="fp16", base_dtype="float32").torch_base_dtype(True) == torch.float32
    with pytest.raises(ConfigError, match="needs mixed precision"):
        DistributedSettings(base_dtype="bfloat16").torch_base_dtype(cuda=True)
    with pytest.raises(ConfigError, match="base must match"):
        DistributedSettings(mixed_precision="fp16", base_dtype="bfloat16", deepspeed=str(ZERO2)).torch_base_dtype(True)


def test_accelerate_launch_deepspeed_config_file_is_used(monkeypatch, tmp_path):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ZERO2))
    assert DistributedSettings().config_path() == str(ZERO2)
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    with pytest.raises(ConfigError, match="without a config file"):
        DistributedSettings().config_path()


def test_cli_reports_a_missing_deepspeed_config(setup, tmp_path):
    missing = tmp_path / "nope.json"
    result = CliRunner().invoke(main, ["train", "--base-model", str(setup / "model"), "--data",
                                       str(setup / "data.jsonl"), "--out", str(tmp_path / "run"),
                                       "--deepspeed", str(missing)])
    assert result.exit_code != 0
    assert "DeepSpeed config not found" in result.output and str(missing) in result.output
    assert not (tmp_path / "run").exists()
