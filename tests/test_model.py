"""SpAFModel: frozen base, parameter budget, checkpoints (round trip, mismatch, corruption)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_base, make_tiny_spaf

from spaf_edge.core.config import CONFIG_FILE, SpAFConfig
from spaf_edge.core.errors import (
    CheckpointMismatchError,
    ConfigError,
    ModelNotFoundError,
    NonFiniteWeightsError,
)
from spaf_edge.generation.reference import spaf_generate
from spaf_edge.model import META_FILE, WEIGHTS_FILE, SpAFModel

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPT = [1, 7, 19, 42, 5]


def expected_spaf_parameter_count(config: SpAFConfig, hidden: int) -> int:
    """Bottleneck adapter + MLP AlignmentHead per exit, from DESIGN §2 (no vocabulary-sized term)."""
    inner = round(config.adapter_dim_ratio * hidden)
    adapter = hidden + 2 * hidden * inner  # norm scale, W_down, W_up
    width = round(config.alignment_head.hidden_dim_ratio * hidden)
    widths = [2 * hidden] + [width] * (config.alignment_head.num_layers - 1) + [hidden]
    alignment = 2 * hidden + sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))
    return len(config.adapter_layers) * (adapter + alignment)


def test_base_is_frozen_and_only_spaf_modules_train():
    model = make_tiny_spaf("llama")
    assert not any(p.requires_grad for p in model.base.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in model.spaf_parameters()}
    assert not model.base.training


def test_spaf_modules_hold_no_copy_of_embedding_or_head():
    config = SpAFConfig(cutoff_layer=2, adapter_layers=[1, 2])
    small = SpAFModel(make_tiny_base("llama", vocab_size=96), config)
    large = SpAFModel(make_tiny_base("llama", vocab_size=700), config)
    # The SpAF parameter count does not grow with the vocabulary and matches the design's formula.
    assert small.num_trainable_parameters() == large.num_trainable_parameters()
    assert small.num_trainable_parameters() == expected_spaf_parameter_count(small.config, small.hidden_size)
    total = sum(p.numel() for p in large.parameters())
    assert total == large.num_base_parameters() + large.num_trainable_parameters()


@pytest.mark.real_model
def test_default_model_trainable_fraction_is_a_few_percent(default_base):
    base, tokenizer = default_base
    model = SpAFModel(base, SpAFConfig(), tokenizer)
    assert model.cutoff == base.config.num_hidden_layers // 2
    assert 0.005 < model.trainable_fraction() < 0.05
    assert model.num_trainable_parameters() == expected_spaf_parameter_count(model.config, model.hidden_size)
    assert not any(p.requires_grad for p in model.base.parameters())


def test_save_load_round_trip_restores_weights_and_generation(tmp_path):
    config = SpAFConfig(cutoff_layer=1, adapter_layers=[1, 3], num_draft_tokens=4, serial_parallel_transition=2)
    saved = make_tiny_spaf("llama", seed=3, spaf_config=config)
    saved.set_draft_vocab(torch.arange(0, 96, 2))
    path = saved.save_spaf_components(tmp_path / "ckpt", extra_meta={"step": 7})
    assert {p.name for p in path.iterdir()} == {WEIGHTS_FILE, CONFIG_FILE, META_FILE}

    loaded = SpAFModel(make_tiny_base("llama", seed=3), SpAFConfig(cutoff_layer=2))
    meta = loaded.load_spaf_components(path)
    assert meta["step"] == 7
    assert loaded.config == saved.config
    for (name, a), (_, b) in zip(saved.spaf_state_dict().items(), loaded.spaf_state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(loaded.draft_vocab, saved.draft_vocab)
    for exit_layer in (1, 3):
        loaded.config.cutoff_layer = saved.config.cutoff_layer = exit_layer
        first = spaf_generate(saved, PROMPT, max_new_tokens=12, temperature=1.0, seed=5, eos_token_ids=[])
        second = spaf_generate(loaded, PROMPT, max_new_tokens=12, temperature=1.0, seed=5, eos_token_ids=[])
        assert first.tokens == second.tokens
        assert first.stats.accepted == second.stats.accepted


def test_loading_resets_a_draft_vocab_the_checkpoint_lacks(tmp_path):
    path = make_tiny_spaf("llama").save_spaf_components(tmp_path / "ckpt")
    model = make_tiny_spaf("llama")
    model.set_draft_vocab(torch.arange(10))
    model.load_spaf_components(path)
    assert model.draft_vocab.numel() == 0


def test_components_refuse_another_base_model(tmp_path):
    path = make_tiny_spaf("llama", seed=0).save_spaf_components(tmp_path / "ckpt")
    other = make_tiny_spaf("llama", seed=1)
    with pytest.raises(CheckpointMismatchError, match="fingerprint"):
        other.load_spaf_components(path)
    with pytest.raises(CheckpointMismatchError):
        make_tiny_spaf("qwen2", seed=0).load_spaf_components(path)


@pytest.mark.parametrize("name", [WEIGHTS_FILE, CONFIG_FILE, META_FILE])
def test_missing_checkpoint_file_is_reported(tmp_path, name):
    path = make_tiny_spaf("llama").save_spaf_components(tmp_path / "ckpt")
    (path / name).unlink()
    with pytest.raises(ModelNotFoundError, match=name):
        make_tiny_spaf("llama").load_spaf_components(path)


def test_corrupt_weights_are_reported(tmp_path):
    path = make_tiny_spaf("llama").save_spaf_components(tmp_path / "ckpt")
    (path / WEIGHTS_FILE).write_bytes(b"\x00garbage" * 8)
    with pytest.raises(ModelNotFoundError, match="corrupt"):
        make_tiny_spaf("llama").load_spaf_components(path)


def test_components_with_nan_or_inf_weights_are_refused(tmp_path):
    model = make_tiny_spaf("llama")
    with torch.no_grad():
        model.adapters["2"].up.weight[0, 0] = float("nan")
        model.alignment_heads["2"].layers[0].bias[1] = float("inf")
    path = model.save_spaf_components(tmp_path / "ckpt")
    with pytest.raises(NonFiniteWeightsError, match=r"'adapters.2.up.weight' holds 1 NaN/inf.*earlier checkpoint"):
        make_tiny_spaf("llama").load_spaf_components(path)


def test_corrupt_meta_and_config_are_reported(tmp_path):
    path = make_tiny_spaf("llama").save_spaf_components(tmp_path / "ckpt")
    (path / META_FILE).write_text("{")
    with pytest.raises(ModelNotFoundError, match="corrupt"):
        make_tiny_spaf("llama").load_spaf_components(path)
    path = make_tiny_spaf("llama").save_spaf_components(tmp_path / "ckpt2")
    (path / CONFIG_FILE).write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        make_tiny_spaf("llama").load_spaf_components(path)


def test_config_that_disagrees_with_weights_is_reported(tmp_path):
    path = make_tiny_spaf("llama").save_spaf_components(tmp_path / "ckpt")
    config = json.loads((path / CONFIG_FILE).read_text())
    config["adapter_dim_ratio"] = 0.5
    (path / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(CheckpointMismatchError, match="different runs"):
        make_tiny_spaf("llama").load_spaf_components(path)


def test_future_checkpoint_format_is_refused(tmp_path):
    path = make_tiny_spaf("llama").save_spaf_components(tmp_path / "ckpt")
    meta = json.loads((path / META_FILE).read_text())
    meta["format_version"] = 99
    (path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointMismatchError, match="format"):
        make_tiny_spaf("llama").load_spaf_components(path)


def test_failed_save_leaves_no_checkpoint(tmp_path, monkeypatch):
    model = make_tiny_spaf("llama")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(SpAFConfig, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        model.save_spaf_components(tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_from_pretrained_loads_folder_and_components(tiny_model_dir, tmp_path):
    model = SpAFModel.from_pretrained(tiny_model_dir, SpAFConfig(cutoff_layer=1))
    with torch.no_grad():
        for param in model.spaf_parameters():
            param.add_(0.05)
    path = model.save_spaf_components(tmp_path / "ckpt")
    again = SpAFModel.from_pretrained(tiny_model_dir, components=path)
    assert again.cutoff == 1
    assert again.tokenizer is not None
    for name, tensor in model.spaf_state_dict().items():
        assert torch.equal(tensor, again.spaf_state_dict()[name]), name


def test_bad_draft_vocab_is_refused():
    model = make_tiny_spaf("llama")
    with pytest.raises(ConfigError, match="draft vocabulary"):
        model.set_draft_vocab(torch.tensor([3, 500]))
    with pytest.raises(ConfigError, match="draft vocabulary"):
        model.set_draft_vocab(torch.tensor([], dtype=torch.long))


def test_atomic_writes_get_the_usual_permissions(tmp_path):
    """Checkpoints and exports are shared files: mode follows the umask, not mkstemp's 0600."""
    import os

    from spaf_edge.core.atomic import atomic_directory, atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        with atomic_directory(tmp_path / "folder") as tmp:
            (tmp / "x").write_text("1")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o755
