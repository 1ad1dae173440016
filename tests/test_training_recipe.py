"""Training recipe options: rollout-step weighting (alignment_rollout_decay) and top-k ranking distillation."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import make_tiny_base, make_tiny_tokenizer, write_text_data
from torch.nn import functional as F

from spaf_edge.cli import main
from spaf_edge.core.config import LossWeights, SpAFConfig
from spaf_edge.core.errors import ConfigError
from spaf_edge.model import SpAFModel
from spaf_edge.training import losses as losses_module
from spaf_edge.training.features import compute_base_features
from spaf_edge.training.losses import (
    DistillSums,
    chunked_distill_terms,
    rollout_mean,
    spaf_losses,
)
from spaf_edge.training.trainer import TrainSettings, train

pytestmark = pytest.mark.usefixtures("single_thread")

REPO = Path(__file__).resolve().parents[1]
# The last commit whose losses.py had neither option: the defaults must reproduce its losses bit for bit.
BEFORE_RECIPE = "d3eee29"


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    return write_text_data(tmp_path_factory.mktemp("data") / "text.jsonl", rows=60)


def tiny_spaf(tokenizer, config, dtype=torch.float32):
    """A tiny random Llama with randomised SpAF modules (so every term and gradient is non-trivial)."""
    base = make_tiny_base("llama", seed=0, initializer_range=0.2, eos_token_id=tokenizer.eos_token_id)
    model = SpAFModel(base, config, tokenizer).to(dtype)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.spaf_parameters():
            param.add_(torch.randn(param.shape, generator=generator, dtype=dtype) * 0.1)
    return model


def recipe_config(**changes):
    values = {"cutoff_layer": 2, "alignment_rollout_steps": 3, "adapter_kind": "fused", "adapter_dim_ratio": 1.0,
              "loss_weights": LossWeights(adapter_base=1.0, adapter_ce=0.3, alignment=1.0, alignment_token=1.0)}
    values.update(changes)
    return SpAFConfig(**values)


def tiny_batch(batch_size=2, seq_len=9, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 80, (batch_size, seq_len), generator=generator)
    mask = torch.ones(batch_size, seq_len)
    mask[0, :2] = 0  # untrained positions, as chat rows have
    mask[:, -1] = 0
    return {"input_ids": ids, "loss_mask": mask}


def losses_and_grads(model, batch, chunk_rows=4, loss_fn=spaf_losses):
    """``loss_fn`` of one batch (detached) and the gradient of its total w.r.t. every SpAF parameter."""
    model.zero_grad(set_to_none=True)
    features = compute_base_features(model, batch["input_ids"])
    losses = loss_fn(model, batch, features, chunk_rows=chunk_rows)
    losses["total"].backward()
    grads = {name: param.grad.clone() for name, param in model.named_parameters()
             if param.requires_grad and param.grad is not None}
    return {name: value.detach() for name, value in losses.items()}, grads


def direct_distill_terms(students, teacher, weight, bias, kl_weights, ce_weights=None, targets=None,
                         topk_weights=None, topk_k=8, chunk_rows=None):
    """chunked_distill_terms as plain unchunked formulas on full logits; autograd gives the gradient."""
    work = torch.promote_types(students.dtype, torch.float32)
    teacher_logp = F.log_softmax(F.linear(teacher, weight, bias).to(work), -1)  # [N, V]
    student_logq = F.log_softmax(F.linear(students, weight, bias).to(work), -1)  # [M, N, V]
    p = teacher_logp.exp()
    kl = ((p * (teacher_logp - student_logq)).sum(-1) * kl_weights).sum(1)
    ce = torch.zeros_like(kl)
    if ce_weights is not None:
        picked = student_logq.gather(-1, targets.clamp(min=0).expand(len(students), -1).unsqueeze(-1)).squeeze(-1)
        ce = (-picked * ce_weights * (targets >= 0)).sum(1)
    topk = torch.zeros_like(kl)
    if topk_weights is not None:
        top_p, top_index = p.topk(min(topk_k, p.shape[-1]), -1)  # [N, K]
        picked = student_logq.gather(-1, top_index.expand(len(students), -1, -1))  # [M, N, K]
        topk = (-(top_p * picked).sum(-1) * topk_weights).sum(1)
    return DistillSums(kl, ce, topk)


# ---- defaults: the old loss, bit for bit ----------------------------------------
def old_losses_module(folder: Path):
    """losses.py as it was before the recipe options (skips where git history is not at hand)."""
    try:
        source = subprocess.run(["git", "show", f"{BEFORE_RECIPE}:spaf_edge/training/losses.py"], cwd=REPO,
                                capture_output=True, text=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        pytest.skip(f"git history with commit {BEFORE_RECIPE} is not available")
    path = folder / "old_losses.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_spaf_losses", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("draft_vocab", [False, True])
def test_defaults_reproduce_the_old_loss_exactly(tokenizer, tmp_path, draft_vocab):
    # decay 1.0 and topk weight 0 (k set to something else: unused) must leave values and gradients bit for bit.
    config = recipe_config(alignment_rollout_decay=1.0, topk_distill_k=3)
    assert config.loss_weights.topk == 0.0
    model = tiny_spaf(tokenizer, config)
    if draft_vocab:
        model.set_draft_vocab(torch.arange(4, 60, 2))
    batch = tiny_batch()
    new_losses, new_grads = losses_and_grads(model, batch)
    old = old_losses_module(tmp_path)
    assert old.spaf_losses is not spaf_losses and not hasattr(old, "rollout_mean")
    old_losses, old_grads = losses_and_grads(model, batch, loss_fn=old.spaf_losses)
    assert set(new_losses) == set(old_losses)
    for name, value in old_losses.items():
        assert torch.equal(new_losses[name], value), name
    assert set(new_grads) == set(old_grads) and new_grads
    for name, value in old_grads.items():
        assert torch.equal(new_grads[name], value), name


def test_default_config_has_both_options_off():
    config = SpAFConfig()
    assert config.alignment_rollout_decay == 1.0 and config.loss_weights.topk == 0.0
    values = torch.tensor([0.3, 0.7, 1.9])
    assert torch.equal(rollout_mean(values, 1.0), values.mean())


# ---- rollout weighting ----------------------------------------------------------
def test_rollout_mean_weighs_step_r_by_decay_to_the_r_minus_1():
    values = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    expected = (1.0 * 1 + 0.5 * 2 + 0.25 * 4) / (1 + 0.5 + 0.25)
    assert float(rollout_mean(values, 0.5)) == pytest.approx(expected, rel=1e-12)
    assert float(rollout_mean(values[:1], 0.3)) == 1.0  # one step: its value, whatever the decay


def test_rollout_decay_weighs_the_alignment_losses_of_each_step(tokenizer, monkeypatch):
    decay = 0.4
    config = recipe_config(alignment_rollout_decay=decay,
                           loss_weights=LossWeights(adapter_base=1.0, alignment=1.0, alignment_token=1.0, topk=0.5))
    model = tiny_spaf(tokenizer, config, torch.float64)
    batch = tiny_batch()
    captured = []

    def capture(*args, **kwargs):
        sums = chunked_distill_terms(*args, **kwargs)
        captured.append(sums)
        return sums

    monkeypatch.setattr(losses_module, "chunked_distill_terms", capture)
    with torch.no_grad():
        features = compute_base_features(model, batch["input_ids"])
        got = spaf_losses(model, batch, features, chunk_rows=5)
        # Direct formula for the state losses of the 3 rolled steps, each a masked mean over its positions.
        hidden, ids, mask = features.cutoff[2], batch["input_ids"], batch["loss_mask"].double()
        previous, per_step = hidden, []
        for step in (1, 2, 3):
            predicted = model.align(ids[:, step:], previous[:, :-1], 2)
            error = (predicted - hidden[:, step:]).pow(2).mean(-1)
            per_step.append((error * mask[:, step:]).sum() / mask[:, step:].sum())
            previous = predicted
    step_weights = torch.tensor([1.0, decay, decay**2], dtype=torch.float64)
    step_weights /= step_weights.sum()
    expected_state = (step_weights * torch.stack(per_step)).sum().float()  # the state loss is computed in fp32
    torch.testing.assert_close(got["align_state/2"], expected_state, rtol=1e-6, atol=0)
    token_kl = captured[0].kl[1:]  # per aligned step
    assert len(token_kl) == 3 and float(token_kl.std()) > 1e-4  # the steps differ, so the weighting shows
    torch.testing.assert_close(got["align_token_kl/2"], (step_weights * token_kl).sum(), rtol=1e-10, atol=0)
    assert abs(float(got["align_token_kl/2"] - token_kl.mean())) > 1e-6  # not the plain mean
    topk = captured[0].topk[1:]
    assert float(topk.std()) > 1e-4
    torch.testing.assert_close(got["align_topk/2"], (step_weights * topk).sum(), rtol=1e-10, atol=0)


# ---- top-k ranking distillation ---------------------------------------------------
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_topk_term_equals_autograd_of_the_direct_formula(with_bias):
    gen = torch.Generator().manual_seed(0)
    num_variants, rows, hidden, vocab = 3, 37, 8, 50
    students = torch.randn(num_variants, rows, hidden, generator=gen, dtype=torch.float64)
    teacher = torch.randn(rows, hidden, generator=gen, dtype=torch.float64) * 2
    weight = torch.randn(vocab, hidden, generator=gen, dtype=torch.float64)
    bias = torch.randn(vocab, generator=gen, dtype=torch.float64) if with_bias else None
    kl_weights = torch.rand(num_variants, rows, generator=gen, dtype=torch.float64)
    kl_weights[0] = 0  # a variant trained by the top-k term alone (adapter_base 0)
    topk_weights = torch.rand(num_variants, rows, generator=gen, dtype=torch.float64)
    topk_weights[2, 10:30] = 0
    ce_weights = torch.rand(num_variants, rows, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    targets[3] = -1
    mix = torch.randn(3, num_variants, generator=gen, dtype=torch.float64)  # arbitrary upstream gradients

    def run(fn, *args, **kwargs):
        x = students.clone().requires_grad_()
        sums = fn(x, *args, **kwargs)
        sum((m * term).sum() for m, term in zip(mix, sums)).backward()
        return [term.detach() for term in sums] + [x.grad]

    for topk_k in (1, 5, vocab + 10):  # k beyond V: the whole vocabulary, i.e. CE(p, q)
        args = (teacher, weight, bias, kl_weights, ce_weights, targets, topk_weights, topk_k)
        expected = run(direct_distill_terms, *args)
        assert float(expected[2].abs().min()) > 0
        for chunk_rows in (1, 7, 64):
            got = run(chunked_distill_terms, *args, chunk_rows=chunk_rows)
            for value, reference in zip(got, expected):
                torch.testing.assert_close(value, reference, rtol=1e-9, atol=1e-12)


def test_topk_with_all_tokens_is_the_cross_entropy_of_p_and_q():
    gen = torch.Generator().manual_seed(3)
    students = torch.randn(2, 11, 6, generator=gen, dtype=torch.float64)
    teacher = torch.randn(11, 6, generator=gen, dtype=torch.float64)
    weight = torch.randn(20, 6, generator=gen, dtype=torch.float64)
    row_weights = torch.rand(2, 11, generator=gen, dtype=torch.float64)
    sums = chunked_distill_terms(students, teacher, weight, None, row_weights, topk_weights=row_weights, topk_k=20,
                                 chunk_rows=4)
    p = torch.softmax(teacher @ weight.T, -1)
    entropy = -(p * p.log()).sum(-1)  # H(p, q) = KL(p || q) + H(p)
    torch.testing.assert_close(sums.topk, sums.kl + (row_weights * entropy).sum(1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("draft_vocab", [False, True])
def test_recipe_losses_and_gradients_equal_the_unchunked_formulas(tokenizer, monkeypatch, draft_vocab):
    # Both options on, every term on; the chunked analytic gradients against autograd on full logits.
    config = recipe_config(alignment_rollout_decay=0.6, topk_distill_k=4,
                           loss_weights=LossWeights(adapter_base=1.0, adapter_ce=0.3, alignment=1.0,
                                                    alignment_token=0.8, topk=0.7))
    model = tiny_spaf(tokenizer, config, torch.float64)
    if draft_vocab:
        model.set_draft_vocab(torch.arange(4, 60, 2))
    batch = tiny_batch()
    got_losses, got_grads = losses_and_grads(model, batch, chunk_rows=3)
    assert {"adapter_topk/2", "align_topk/2"} <= set(got_losses)
    monkeypatch.setattr(losses_module, "chunked_distill_terms", direct_distill_terms)
    want_losses, want_grads = losses_and_grads(model, batch)
    assert set(got_losses) == set(want_losses)
    for name, value in want_losses.items():
        torch.testing.assert_close(got_losses[name], value, rtol=1e-9, atol=1e-12, msg=name)
    assert set(got_grads) == set(want_grads) and got_grads
    for name, value in want_grads.items():
        assert float(value.abs().max()) > 0, name
        torch.testing.assert_close(got_grads[name], value, rtol=1e-7, atol=1e-10, msg=name)


def test_topk_term_is_the_teachers_top_k_on_the_draft_vocabulary(tokenizer):
    config = SpAFConfig(cutoff_layer=2, topk_distill_k=3,
                        loss_weights=LossWeights(adapter_base=1.0, alignment=0.0, alignment_token=0.0, topk=1.0))
    model = tiny_spaf(tokenizer, config)
    vocab = torch.tensor([3, 5, 8, 13, 21, 40, 41, 42])
    model.set_draft_vocab(vocab)
    batch = tiny_batch(seq_len=7)
    features = compute_base_features(model, batch["input_ids"])
    with torch.no_grad():
        got = spaf_losses(model, batch, features, chunk_rows=5)
        p = torch.softmax(model.base(batch["input_ids"]).logits, -1)[..., vocab]
        p = p / p.sum(-1, keepdim=True)  # the teacher on V_d
        previous_top = torch.cat([torch.zeros_like(features.final[:, :1]), features.final[:, :-1]], 1)
        log_q = torch.log_softmax(model.draft_logits(features.cutoff[2], prev_top=previous_top), -1)
        top_p, top_index = p.topk(3, -1)
        per_position = -(top_p * log_q.gather(-1, top_index)).sum(-1)
        mask = batch["loss_mask"]
        expected = (per_position * mask).sum() / mask.sum()
    assert set(got) == {"adapter_kl/2", "adapter_topk/2", "total"}
    torch.testing.assert_close(got["adapter_topk/2"], expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got["total"], got["adapter_kl/2"] + got["adapter_topk/2"])


def test_topk_trains_the_aligned_drafts_without_the_token_kl(tokenizer):
    config = recipe_config(loss_weights=LossWeights(adapter_base=1.0, alignment=1.0, alignment_token=0.0, topk=0.5))
    model = tiny_spaf(tokenizer, config)
    batch = tiny_batch()
    losses = spaf_losses(model, batch, compute_base_features(model, batch["input_ids"]))
    assert "align_token_kl/2" not in losses and "align_topk/2" in losses
    expected = losses["adapter_kl/2"] + losses["align_state/2"] + 0.5 * (losses["adapter_topk/2"]
                                                                          + losses["align_topk/2"])
    torch.testing.assert_close(losses["total"], expected)


# ---- configuration and errors -------------------------------------------------------
def test_recipe_settings_round_trip_through_json(tmp_path):
    data = {"alignment_rollout_decay": 0.5, "topk_distill_k": 4, "loss_weights": {"topk": 0.3}}
    config = SpAFConfig.from_dict(data)
    assert (config.alignment_rollout_decay, config.topk_distill_k, config.loss_weights.topk) == (0.5, 4, 0.3)
    assert SpAFConfig.load(config.save(tmp_path)) == config
    old = {"loss_weights": {"adapter_base": 1.0, "adapter_ce": 0.0, "alignment": 1.0, "alignment_token": 1.0}}
    assert SpAFConfig.from_dict(old) == SpAFConfig()  # configs written before the options load with them off


BAD_RECIPES = [
    ({"alignment_rollout_decay": 0}, "alignment_rollout_decay"),
    ({"alignment_rollout_decay": -0.5}, "alignment_rollout_decay"),
    ({"alignment_rollout_decay": 1.5}, "alignment_rollout_decay"),
    ({"alignment_rollout_decay": float("nan")}, "alignment_rollout_decay"),
    ({"alignment_rollout_decay": "fast"}, "alignment_rollout_decay"),
    ({"topk_distill_k": 0}, "topk_distill_k"),
    ({"topk_distill_k": 2.5}, "topk_distill_k"),
    ({"topk_distill_k": True}, "topk_distill_k"),
    ({"loss_weights": {"topk": -1}}, "loss_weights.topk"),
    ({"loss_weights": {"topk": "x"}}, "loss_weights.topk"),
]


@pytest.mark.parametrize("settings, name", BAD_RECIPES, ids=[str(s) for s, _ in BAD_RECIPES])
def test_bad_recipe_setting_is_named_with_its_range(settings, name):
    with pytest.raises(ConfigError, match=rf"Invalid {name}=.*expected"):
        SpAFConfig.from_dict(settings)


def test_decay_error_says_what_the_decay_does():
    with pytest.raises(ConfigError, match=r"alignment_rollout_decay=2.*\(0, 1\]: rollout step r weighs decay"):
        SpAFConfig().replace(alignment_rollout_decay=2.0)


def test_chunked_terms_refuse_a_bad_k():
    students = torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match="topk_k=0"):
        chunked_distill_terms(students, students[0], torch.zeros(4, 3), None, torch.ones(1, 2),
                              topk_weights=torch.ones(1, 2), topk_k=0)


# ---- training runs ------------------------------------------------------------------
def test_training_with_both_options_lowers_the_topk_terms(tokenizer, text_data, tmp_path):
    # The drafts learn from the top-k term alone (no KL), so its decrease is its own gradient's doing.
    weights = LossWeights(adapter_base=0.0, alignment=1.0, alignment_token=0.0, topk=1.0)
    config = SpAFConfig(cutoff_layer=2, alignment_rollout_steps=2, alignment_rollout_decay=0.5, topk_distill_k=4,
                        loss_weights=weights)
    base = make_tiny_base("llama", seed=0, initializer_range=0.2, eos_token_id=tokenizer.eos_token_id)
    model = SpAFModel(base, config, tokenizer)
    settings = TrainSettings(steps=40, batch_size=4, seq_len=24, lr=1e-2, warmup=2, eval_every=20, save_every=0,
                             eval_fraction=0.1, logit_chunk_rows=40)
    result = train(model, text_data, tmp_path, settings, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    evals = [row for row in rows if row["split"] == "eval"]
    assert result.steps == 40 and [row["step"] for row in evals] == [0, 20, 40]
    assert {"adapter_kl/2", "align_token_kl/2"}.isdisjoint(evals[0])
    for name in ("adapter_topk/2", "align_topk/2", "align_state/2", "total"):
        assert evals[-1][name] < evals[1][name] < evals[0][name], name
    saved = SpAFConfig.load(result.final)
    assert (saved.alignment_rollout_decay, saved.topk_distill_k, saved.loss_weights.topk) == (0.5, 4, 1.0)


def invoke(*args):
    return CliRunner().invoke(main, [str(arg) for arg in args])


def test_cli_sets_both_options_and_refuses_them_on_resume(tiny_model_dir, text_data, tmp_path):
    run_dir = tmp_path / "run"
    common = ["--base-model", tiny_model_dir, "--out", run_dir, "--no-progress"]
    result = invoke("train", *common, "--data", text_data, "--rollout-decay", 0)
    assert result.exit_code != 0 and "alignment_rollout_decay=0" in result.output
    result = invoke("train", *common, "--data", text_data, "--cutoff-layer", 2, "--steps", 2, "--batch-size", 2,
                    "--seq-len", 16, "--eval-every", 0, "--save-every", 2, "--rollout-steps", 2,
                    "--rollout-decay", 0.5, "--topk-weight", 0.25, "--topk-k", 3, "--draft-vocab-size", 20,
                    "--logit-chunk-rows", 8)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{"):])
    assert {"adapter_topk/2", "align_topk/2", "align_token_kl/2"} <= set(summary["train_losses"])
    saved = json.loads((run_dir / "final" / "spaf_config.json").read_text())
    assert saved["alignment_rollout_decay"] == 0.5 and saved["topk_distill_k"] == 3
    assert saved["loss_weights"]["topk"] == 0.25
    result = invoke("train", *common, "--resume", "--steps", 3, "--topk-weight", 0.5)
    assert result.exit_code != 0 and "--resume keeps the saved SpAF config" in result.output
    assert "drop --topk-weight" in result.output
    # a new run from the components may change the recipe, not the modules
    tuned = tmp_path / "tuned"
    start = ["--base-model", tiny_model_dir, "--out", tuned, "--data", text_data, "--init-from", run_dir / "final",
             "--steps", 1, "--batch-size", 2, "--seq-len", 16, "--eval-every", 0, "--logit-chunk-rows", 8]
    result = invoke("train", *start, "--cutoff-layer", 1)
    assert result.exit_code != 0 and "drop --cutoff-layer" in result.output
    result = invoke("train", *start, "--rollout-decay", 0.8, "--topk-weight", 0.5)
    assert result.exit_code == 0, result.output
    tuned_config = json.loads((tuned / "final" / "spaf_config.json").read_text())
    assert tuned_config["alignment_rollout_decay"] == 0.8 and tuned_config["loss_weights"]["topk"] == 0.5
    assert tuned_config["topk_distill_k"] == 3 and tuned_config["draft_vocab_size"] == 20
