"""Training that survives machines: a run folder moved elsewhere resumes its steps and data order,
and the compact trainer state (bf16 optimizer moments) loads, resumes closely and fails clearly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import make_tiny_base, make_tiny_tokenizer, write_text_data
from safetensors.torch import load_file, save_file

from spaf_edge.cli import main
from spaf_edge.core.config import SpAFConfig
from spaf_edge.core.errors import ConfigError, ModelNotFoundError
from spaf_edge.model import SpAFModel
from spaf_edge.training import checkpoint as ckpt
from spaf_edge.training import trainer
from spaf_edge.training.trainer import TrainSettings, train

pytestmark = pytest.mark.usefixtures("single_thread")



@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()




def tiny_spaf(tokenizer):
    base = make_tiny_base("llama", seed=0, initializer_range=0.2, eos_token_id=tokenizer.eos_token_id)
    return SpAFModel(base, SpAFConfig(cutoff_layer=2, alignment_rollout_steps=2), tokenizer)


def settings(**changes):
    values = dict(steps=10, batch_size=4, seq_len=32, lr=3e-3, warmup=3, eval_every=0, save_every=4,
                  eval_fraction=0.1, logit_chunk_rows=40)
    return TrainSettings(**{**values, **changes})


class Interrupt(Exception):
    pass


def stop_after_checkpoint(monkeypatch, step: int) -> None:
    """The process dies right after writing the checkpoint of ``step``."""
    original = ckpt.save_checkpoint

    def save_then_stop(run_dir, model, state, run_settings, **kwargs):
        path = original(run_dir, model, state, run_settings, **kwargs)
        if state["step"] == step:
            raise Interrupt()
        return path

    monkeypatch.setattr(ckpt, "save_checkpoint", save_then_stop)


@pytest.fixture
def trained_sequences(monkeypatch):
    """The sequence indices of every training micro-batch, in order."""
    seen: list[list[int]] = []
    original = trainer.LossModule.forward

    def recording_forward(self, batch):
        if self.training:
            seen.append(batch["index"].tolist())
        return original(self, batch)

    monkeypatch.setattr(trainer.LossModule, "forward", recording_forward)
    return seen


def train_log(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / trainer.LOG_FILE).read_text().splitlines()]
    return [row for row in rows if row["split"] == "train"]


def folder_spaf(model_dir: Path) -> SpAFModel:
    torch.manual_seed(0)  # the SpAF modules' initial weights
    return SpAFModel.from_pretrained(model_dir, SpAFConfig(cutoff_layer=2, alignment_rollout_steps=2))


def test_a_moved_run_resumes_its_steps_and_data_order_on_a_new_machine(tiny_model_dir, tmp_path, monkeypatch,
                                                                       trained_sequences):
    old, new = tmp_path / "old_machine", tmp_path / "new_machine"
    write_text_data(old / "data" / "train.jsonl")
    monkeypatch.chdir(old)
    train(folder_spaf(tiny_model_dir), old / "data" / "train.jsonl", old / "runs" / "full", settings(),
          progress=False)
    full_order = list(trained_sequences)
    full_weights = load_file(str(old / "runs" / "full" / trainer.FINAL / "spaf_components.safetensors"))

    trained_sequences.clear()
    with monkeypatch.context() as patch:
        stop_after_checkpoint(patch, 8)
        with pytest.raises(Interrupt):  # an absolute path inside the folder the run starts from
            train(folder_spaf(tiny_model_dir), old / "data" / "train.jsonl", old / "runs" / "split", settings(),
                  progress=False)
    assert trained_sequences == full_order[:8]
    saved = json.loads((old / "runs" / "split" / ckpt.SETTINGS).read_text())
    assert saved["data"] == str(Path("data") / "train.jsonl")  # recorded relative: no path of the old machine
    position = ckpt.load_trainer_state(old / "runs" / "split" / ckpt.CHECKPOINT)["data"]
    assert (position["epoch"], position["micro_batch"]) == divmod(8, position["micro_batches_per_epoch"])

    # A fresh clone elsewhere: the committed run folder and data at the same relative paths, the old tree gone.
    shutil.copytree(old / "runs" / "split", new / "state" / "run")
    shutil.copytree(old / "data", new / "data")
    shutil.rmtree(old)
    monkeypatch.chdir(new)
    trained_sequences.clear()
    result = trainer.train_run(str(tiny_model_dir), None, Path("state") / "run", resume=True,
                               progress=False)  # no --data: the recorded relative path

    assert result.steps == 10
    assert trained_sequences == full_order[8:]  # the data order continues where it stopped
    assert [row["step"] for row in train_log(new / "state" / "run")] == list(range(1, 11))
    resumed_weights = load_file(str(new / "state" / "run" / trainer.FINAL / "spaf_components.safetensors"))
    for name, value in full_weights.items():
        torch.testing.assert_close(resumed_weights[name], value, rtol=1e-6, atol=1e-7, msg=name)


def interrupted_run(tokenizer, tmp_path, monkeypatch, **changes) -> tuple[Path, Path]:
    data = write_text_data(tmp_path / "train.jsonl")
    run_dir = tmp_path / "run"
    with monkeypatch.context() as patch:
        stop_after_checkpoint(patch, 4)
        with pytest.raises(Interrupt):
            train(tiny_spaf(tokenizer), data, run_dir, settings(**changes), progress=False)
    return data, run_dir


def test_resume_refuses_data_that_gives_other_sequences(tokenizer, tmp_path, monkeypatch):
    data, run_dir = interrupted_run(tokenizer, tmp_path, monkeypatch)
    other = write_text_data(tmp_path / "other.jsonl", seed=1)
    with pytest.raises(ConfigError, match=r"data position \(epoch 0, micro-batch 4\) would point at other "
                                          r"sequences.*--init-from"):
        train(tiny_spaf(tokenizer), other, run_dir, settings(), resume=True, progress=False)
    fewer = tmp_path / "fewer.jsonl"
    fewer.write_text("".join(data.read_text().splitlines(keepends=True)[:60]))
    with pytest.raises(ConfigError, match="would point at other sequences"):
        train(tiny_spaf(tokenizer), fewer, run_dir, settings(), resume=True, progress=False)
    shutil.copy(data, tmp_path / "copy.jsonl")  # the same rows anywhere else are fine
    assert train(tiny_spaf(tokenizer), tmp_path / "copy.jsonl", run_dir, settings(), resume=True,
                 progress=False).steps == 10


def test_resume_names_a_data_file_missing_on_this_machine(tokenizer, tmp_path, monkeypatch):
    data, run_dir = interrupted_run(tokenizer, tmp_path, monkeypatch)
    data.unlink()
    with pytest.raises(ConfigError, match=r"train.jsonl, which is not on this machine.*Pass --data"):
        trainer.train_run(None, None, run_dir, resume=True, progress=False)


def test_portable_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert ckpt.portable_path(tmp_path / "data" / "x.jsonl") == str(Path("data") / "x.jsonl")
    assert ckpt.portable_path("data/x.jsonl") == "data/x.jsonl"
    outside = tmp_path.parent / "elsewhere.jsonl"
    assert ckpt.portable_path(outside) == str(outside)


# ---- compact state ------------------------------------------------------------


def test_compact_state_stores_bf16_moments_and_resumes_close_to_an_uninterrupted_run(tokenizer, tmp_path,
                                                                                     monkeypatch):
    data = write_text_data(tmp_path / "train.jsonl")
    full = tiny_spaf(tokenizer)
    train(full, data, tmp_path / "full", settings(steps=16, save_every=0), progress=False)
    exact_dir = tmp_path / "exact"
    with monkeypatch.context() as patch:
        stop_after_checkpoint(patch, 8)
        with pytest.raises(Interrupt):
            train(tiny_spaf(tokenizer), data, exact_dir, settings(steps=16, save_every=8), progress=False)
    compact_dir = tmp_path / "compact"
    with monkeypatch.context() as patch:
        stop_after_checkpoint(patch, 8)
        with pytest.raises(Interrupt):
            train(tiny_spaf(tokenizer), data, compact_dir, settings(steps=16, save_every=8, compact_state=True),
                  progress=False)

    exact_tensors = load_file(str(exact_dir / ckpt.CHECKPOINT / ckpt.TRAINER_TENSORS))
    compact_tensors = load_file(str(compact_dir / ckpt.CHECKPOINT / ckpt.TRAINER_TENSORS))
    assert {t.dtype for t in compact_tensors.values() if t.numel() > 1 and t.is_floating_point()} == {torch.bfloat16}
    exact_bytes = (exact_dir / ckpt.CHECKPOINT / ckpt.TRAINER_TENSORS).stat().st_size
    compact_bytes = (compact_dir / ckpt.CHECKPOINT / ckpt.TRAINER_TENSORS).stat().st_size
    moment_bytes = [sum(t.numel() * t.element_size() for t in tensors.values()
                        if t.is_floating_point() and t.numel() > 1) for tensors in (exact_tensors, compact_tensors)]
    assert moment_bytes[1] * 2 == moment_bytes[0] > 0
    assert exact_bytes - compact_bytes >= moment_bytes[1]  # the file shrinks by what the moments lose
    weights = [load_file(str(folder / ckpt.CHECKPOINT / ckpt.COMPONENTS / "spaf_components.safetensors"))
               for folder in (exact_dir, compact_dir)]
    assert {v.dtype for v in weights[1].values()} == {torch.float32}  # the components stay fp32 and exact
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])

    loaded = ckpt.load_trainer_state(compact_dir / ckpt.CHECKPOINT)
    exact = ckpt.load_trainer_state(exact_dir / ckpt.CHECKPOINT)
    for index, values in exact["optimizer"]["state"].items():
        for name, value in values.items():
            restored = loaded["optimizer"]["state"][index][name]
            assert restored.dtype == value.dtype  # cast back on load
            torch.testing.assert_close(restored, value, rtol=2 ** -8, atol=0, msg=name)
    assert loaded["step"] == exact["step"] and loaded["scheduler"] == exact["scheduler"]
    assert loaded["data"] == exact["data"]
    assert len(exact_tensors) == len(compact_tensors)

    resumed_exact, resumed_compact = tiny_spaf(tokenizer), tiny_spaf(tokenizer)
    train(resumed_exact, data, exact_dir, settings(steps=16, save_every=8), resume=True, progress=False)
    train(resumed_compact, data, compact_dir, settings(steps=16, save_every=8, compact_state=True), resume=True,
          progress=False)
    exact_drift = compact_drift = 0.0
    for name, value in full.spaf_state_dict().items():
        if value.is_floating_point():
            exact_drift = max(exact_drift, float((resumed_exact.spaf_state_dict()[name] - value).abs().max()))
            compact_drift = max(compact_drift, float((resumed_compact.spaf_state_dict()[name] - value).abs().max()))
    assert exact_drift < 1e-6
    assert 0 < compact_drift < 2e-3  # measured 1e-4 after 100 resumed steps (benchmarks/results/training-state)
    losses = [row["total"] for row in train_log(compact_dir)]
    assert losses == pytest.approx([row["total"] for row in train_log(tmp_path / "full")], rel=1e-3)
    saved = ckpt.load_checkpoint_settings(compact_dir / ckpt.CHECKPOINT)
    assert saved["train"]["compact_state"] is True


def test_compact_state_may_change_on_resume(tokenizer, tmp_path, monkeypatch):
    data, run_dir = interrupted_run(tokenizer, tmp_path, monkeypatch)
    train(tiny_spaf(tokenizer), data, run_dir, settings(compact_state=True), resume=True, progress=False)
    tensors = load_file(str(run_dir / ckpt.CHECKPOINT / ckpt.TRAINER_TENSORS))
    assert torch.bfloat16 in {t.dtype for t in tensors.values()}


def test_corrupt_compact_state_is_a_clear_error(tokenizer, tmp_path, monkeypatch):
    data, run_dir = interrupted_run(tokenizer, tmp_path, monkeypatch, compact_state=True)
    checkpoint = run_dir / ckpt.CHECKPOINT
    tensors_file = checkpoint / ckpt.TRAINER_TENSORS
    original = tensors_file.read_bytes()

    tensors = load_file(str(tensors_file))  # a "$compact" tensor stored in full precision: not what was written
    save_file({k: v.float() if v.dtype == torch.bfloat16 else v for k, v in tensors.items()}, str(tensors_file))
    with pytest.raises(ModelNotFoundError, match="not a half type.*corrupt"):
        ckpt.load_trainer_state(checkpoint)
    tensors_file.write_bytes(original[: len(original) // 2])  # cut short in a copy between machines
    with pytest.raises(ModelNotFoundError, match="corrupt"):
        train(tiny_spaf(tokenizer), data, run_dir, settings(), resume=True, progress=False)
    tensors_file.write_bytes(original)
    text = (checkpoint / ckpt.TRAINER_STATE).read_text()
    (checkpoint / ckpt.TRAINER_STATE).write_text(text.replace('"float32"]', '"float99"]', 1))
    with pytest.raises(ModelNotFoundError, match="corrupt"):
        ckpt.load_trainer_state(checkpoint)


def test_a_compact_state_of_other_components_is_refused(tokenizer, tmp_path, monkeypatch):
    data, run_dir = interrupted_run(tokenizer, tmp_path, monkeypatch, compact_state=True)
    other = SpAFModel(tiny_spaf(tokenizer).base, SpAFConfig(cutoff_layer=2, adapter_dim_ratio=0.5), tokenizer)
    components = run_dir / ckpt.CHECKPOINT / ckpt.COMPONENTS
    shutil.rmtree(components)
    other.save_spaf_components(components)  # another run's components beside this run's optimizer state
    with pytest.raises(ConfigError, match="does not match its components.*mixes files of different runs"):
        train(tiny_spaf(tokenizer), data, run_dir, settings(), resume=True, progress=False)


def test_compact_state_refuses_a_zero_partitioned_optimizer():
    with pytest.raises(ConfigError, match="--compact-state needs a plain torch optimizer"):
        ckpt.compact_state({"step": 1, "optimizer": [{"state": {}}]})


def test_cli_compact_state_resumes_in_a_moved_folder(tiny_model_dir, tmp_path, monkeypatch):
    data = write_text_data(tmp_path / "clone_a" / "data.jsonl")
    monkeypatch.chdir(tmp_path / "clone_a")
    common = ["--base-model", str(tiny_model_dir), "--no-progress"]
    result = CliRunner().invoke(main, ["train", *common, "--data", str(data), "--out", "run", "--cutoff-layer", "2",
                                       "--steps", "4", "--batch-size", "2", "--seq-len", "16", "--save-every", "2",
                                       "--eval-every", "0", "--logit-chunk-rows", "8", "--compact-state"])
    assert result.exit_code == 0, result.output
    shutil.copytree(tmp_path / "clone_a", tmp_path / "clone_b")
    shutil.rmtree(tmp_path / "clone_a")
    monkeypatch.chdir(tmp_path / "clone_b")
    result = CliRunner().invoke(main, ["train", *common, "--out", "run", "--resume", "--steps", "6"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output[result.output.index("{"):])["steps"] == 6
    assert ckpt.load_trainer_state(Path("run") / ckpt.CHECKPOINT)["step"] == 6


class Clock:
    """``time.perf_counter`` advancing one second per call."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        self.now += 1.0
        return self.now


def test_stop_after_checkpoints_and_a_resume_keeps_the_schedule(tokenizer, tmp_path, monkeypatch):
    data = write_text_data(tmp_path / "train.jsonl")
    full = tiny_spaf(tokenizer)
    train(full, data, tmp_path / "full", settings(steps=12, save_every=0), progress=False)

    run_dir = tmp_path / "sliced"
    with monkeypatch.context() as patch:
        patch.setattr(trainer.time, "perf_counter", Clock().perf_counter)
        result = train(tiny_spaf(tokenizer), data, run_dir, settings(steps=12, save_every=0, stop_after=12.0),
                       progress=False)
    assert 1 < result.steps < 12
    assert ckpt.load_trainer_state(run_dir / ckpt.CHECKPOINT)["step"] == result.steps  # saved without save_every
    stops = [json.loads(line) for line in (run_dir / trainer.LOG_FILE).read_text().splitlines()]
    assert [row["steps"] for row in stops if row["split"] == "stop"] == [12]  # the schedule was not cut
    saved = ckpt.load_checkpoint_settings(run_dir / ckpt.CHECKPOINT)["train"]
    assert saved["stop_after"] is None and saved["steps"] == 12  # for one call only

    resumed = tiny_spaf(tokenizer)
    assert train(resumed, data, run_dir, settings(steps=12, save_every=0), resume=True, progress=False).steps == 12
    for name, value in full.spaf_state_dict().items():
        torch.testing.assert_close(resumed.spaf_state_dict()[name], value, rtol=1e-6, atol=1e-7, msg=name)
    assert [row["lr"] for row in train_log(run_dir)] == [row["lr"] for row in train_log(tmp_path / "full")]


def test_a_resume_with_more_steps_follows_the_new_schedule_from_its_first_step(tokenizer, tmp_path, monkeypatch):
    data, run_dir = interrupted_run(tokenizer, tmp_path, monkeypatch)  # stopped at step 4 of 10
    longer = settings(steps=40)
    train(tiny_spaf(tokenizer), data, run_dir, longer, resume=True, progress=False)
    rates = {row["step"]: row["lr"] for row in train_log(run_dir)}
    assert rates[5] == pytest.approx(longer.lr * trainer.lr_factor(4, longer))  # not the old schedule's rate
    assert rates[5] != pytest.approx(longer.lr * trainer.lr_factor(4, settings()))
