"""The ``layer_fusion`` drafter kind: config, training features, export and the engine.

Its adapter reads, for a verified previous position, the top state fused with the states
after ``fusion_layers`` (computed by the upper stack); drafted positions read their drafted
top state as the attention kind does. Tiny random Llamas, as in test_runtime.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_tiny_spaf
from test_reference_generation import make_upper_identity
from test_runtime import (
    PAIRS,
    PROMPTS,
    check_greedy_against_reference,
    check_sampling_draw_for_draw,
    export,
)

from spaf_edge.core import io_names
from spaf_edge.core.config import SpAFConfig
from spaf_edge.core.errors import ConfigError
from spaf_edge.model import SpAFModel
from spaf_edge.runtime.engine import Engine
from spaf_edge.training.features import compute_base_features
from spaf_edge.training.losses import spaf_losses
from spaf_edge.validation.graph_parity import check_graphs

pytestmark = pytest.mark.usefixtures("single_thread")

EXPORTABLE = dict(hidden_size=64)  # head_dim 16, as ORT's GroupQueryAttention needs
FUSION = SpAFConfig(cutoff_layer=2, adapter_kind="layer_fusion", adapter_dim_ratio=1.0, fusion_rank=8,
                    alignment_rollout_steps=2)


def make_fusion_spaf(seed: int = 0, identity_upper: bool = False, **overrides) -> SpAFModel:
    """Tiny Llama (4 layers, fusing the state after layer 3) with random SpAF weights, fusion included."""
    model = make_tiny_spaf("llama", seed, spaf_config=FUSION, **EXPORTABLE, **overrides)
    if identity_upper:  # drafts get accepted: the full model is early exit at the cutoff
        make_upper_identity(model)
    return model


def fused_previous_tops(model: SpAFModel, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cutoff states, what the adapter reads for each position's predecessor) of a full forward. [B, S, H] each"""
    states = model.base_features(ids)
    fused = model.adapter().fuse(states[-1], [states[3]])  # by hand: the top state and the state after layer 3
    return states[2], torch.nn.functional.pad(fused[:, :-1], (0, 0, 1, 0))


# ---- config -------------------------------------------------------------------------------
def test_fusion_layers_default_to_midway_and_are_checked():
    model = make_fusion_spaf()
    assert model.fused_layers() == (3,) and model.config.fusion_layers is None  # (2 + 4) // 2
    assert SpAFConfig(cutoff_layer=10, fusion_layers=[25, 12]).resolved(30).fusion_layers == [12, 25]
    for bad in ([2], [4], [1]):  # the cutoff itself, the top, below the cutoff
        with pytest.raises(ConfigError, match=r"fusion_layers.*3\.\.3"):
            SpAFConfig(cutoff_layer=2, fusion_layers=bad).resolved(4)
    with pytest.raises(ConfigError, match="fusion_rank"):
        SpAFConfig.from_dict({"fusion_rank": 0})
    with pytest.raises(ConfigError, match="above the last exit"):  # no layer between the exit 3 and the top 4
        make_tiny_spaf("llama", spaf_config=SpAFConfig(cutoff_layer=3, adapter_kind="layer_fusion"))


def test_untrained_fusion_is_the_attention_kind_with_its_weights():
    """The fusion starts at zero: attention-kind weights loaded into it give the same drafts, so a
    layer_fusion run can start from trained attention components."""
    attention = make_tiny_spaf("llama", 3, spaf_config=FUSION.replace(adapter_kind="attention"), **EXPORTABLE)
    fusion = make_tiny_spaf("llama", 3, randomize=False, spaf_config=FUSION, **EXPORTABLE)
    missing, unexpected = fusion.load_state_dict(attention.state_dict(), strict=False)
    assert not unexpected and {k.split(".")[2] for k in missing if k.startswith("adapters.")} == {
        "fusion_norms", "fusion_down", "fusion_up"}
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        features = compute_base_features(fusion, ids)
        assert torch.equal(fusion.exact_top(features.final, features.layers), features.final)
        batch = {"input_ids": ids, "loss_mask": torch.ones(ids.shape)}
        expected = spaf_losses(attention, batch, compute_base_features(attention, ids))
        got = spaf_losses(fusion, batch, features)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name])


# ---- training ----------------------------------------------------------------------------
def test_fusion_loss_reads_the_fused_previous_top_and_trains_the_fusion():
    model = make_fusion_spaf(seed=1, initializer_range=0.2)  # peaked teacher distributions: KL terms not ~0
    with torch.no_grad():  # the previous top state weighs in the drafts
        model.adapter().fusion_up[0].weight.mul_(20)
        model.adapter().out.weight.mul_(10)
    ids = torch.randint(0, 90, (2, 9))
    batch = {"input_ids": ids, "loss_mask": torch.ones(2, 9)}
    features = compute_base_features(model, ids)
    assert set(features.layers) == {3}
    losses = spaf_losses(model, batch, features)
    losses["adapter_kl/2"].backward()
    adapter = model.adapter()
    assert adapter.fusion_up[0].weight.grad.abs().sum() > 0 and adapter.fusion_down[0].weight.grad.abs().sum() > 0
    with torch.no_grad():
        p = torch.softmax(model.base(ids).logits, -1)
        hidden, previous = fused_previous_tops(model, ids)
        context = model.adapter_context(hidden, previous)
        log_q = torch.log_softmax(model.head(model.adapt(hidden, prev_top=previous, context=context)), -1)
        expected = (p * (p.log() - log_q)).sum(-1).mean()
        plain = torch.nn.functional.pad(features.final[:, :-1], (0, 0, 1, 0))  # the unfused top state
        context = model.adapter_context(hidden, plain)
        log_plain = torch.log_softmax(model.head(model.adapt(hidden, prev_top=plain, context=context)), -1)
        unfused = (p * (p.log() - log_plain)).sum(-1).mean()
    torch.testing.assert_close(losses["adapter_kl/2"].detach(), expected, rtol=1e-5, atol=1e-7)
    assert abs(float(unfused) - float(expected)) > 1e-3  # the test can tell a fusion that is not read


# ---- export and engine ---------------------------------------------------------------------
def test_fusion_export_parity_and_the_lm_head_reads_the_top_state(tmp_path):
    model = make_fusion_spaf(seed=4)
    folder = export(model, tmp_path / "fusion", max_length=64)
    report = check_graphs(model, folder)
    assert report.passed, report.summary()
    assert report.worst("upper", io_names.TOP_HIDDEN)["max_rel"] <= 1e-4
    with torch.no_grad():  # so the graph emits the fusion (and its logits the unfused top state's head)
        features = compute_base_features(model, torch.tensor([PROMPTS[0]]))
        assert (model.exact_top(features.final, features.layers) - features.final).abs().amax() > 1e-2
    # the check sees the fusion path: a changed fusion moves the upper graph's top_hidden error alone
    with torch.no_grad():
        model.adapter().fusion_up[0].weight.mul_(1.5)
    changed = check_graphs(model, folder)
    assert changed.worst("upper", io_names.TOP_HIDDEN)["max_rel"] > 1e-2
    assert changed.worst("upper", io_names.LOGITS)["max_rel"] <= 1e-4


@pytest.fixture(scope="module")
def fusing(tmp_path_factory):
    model = make_fusion_spaf(identity_upper=True)
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():  # the fusion changes drafts: what the engine is checked on below reads it
        hidden, fused = fused_previous_tops(model, ids)
        plain = torch.nn.functional.pad(model.base_features(ids)[-1][:, :-1], (0, 0, 1, 0))
        drafts = model.head(model.adapt(hidden, prev_top=fused, context=model.adapter_context(hidden, fused)))
        unfused = model.head(model.adapt(hidden, prev_top=plain, context=model.adapter_context(hidden, plain)))
    assert (drafts - unfused).abs().amax() > 1e-3
    return model, export(model, tmp_path_factory.mktemp("rt") / "fusion")


@pytest.fixture(scope="module")
def fusing_engine(fusing):
    return Engine.from_folder(fusing[1])


@pytest.mark.parametrize("num_drafts,transition", PAIRS)
def test_fusion_greedy_equals_reference_and_base(fusing, fusing_engine, num_drafts, transition):
    check_greedy_against_reference(fusing[0], fusing_engine, num_drafts, transition)


def test_fusion_sampling_matches_the_reference_draw_for_draw(fusing, fusing_engine):
    check_sampling_draw_for_draw(fusing[0], fusing_engine, [0, 1, 2, 0])


def test_fusion_engine_keeps_the_fused_top_state_of_the_last_verified_position(fusing, fusing_engine):
    """After a generation, the top state the engine kept for T-1 is the fusion of a fresh forward's."""
    model, _ = fusing
    result = fusing_engine.generate(PROMPTS[1], max_new_tokens=16, num_draft_tokens=3, serial_parallel_transition=1)
    tokens = fusing_engine.decoder.tokens
    assert tokens[-len(result.tokens):] == result.tokens
    with torch.no_grad():
        _, previous = fused_previous_tops(model, torch.tensor([tokens]))
    np.testing.assert_allclose(fusing_engine.decoder.exact_top, previous[:, -1:].numpy(), rtol=1e-4, atol=1e-5)
