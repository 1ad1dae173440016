"""Draft agreement: teacher-forced top-1 agreement of the drafters with the base's greedy token."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import make_tiny_spaf
from test_reference_generation import hf_greedy, make_upper_identity

from spaf_edge.cli.agreement import command as agreement_command
from spaf_edge.core.config import SpAFConfig
from spaf_edge.model import SpAFModel
from spaf_edge.training.agreement import ReferenceReply, measure_agreement

pytestmark = pytest.mark.usefixtures("single_thread")


def replies_of(model, prompts, new_tokens=24):
    return [ReferenceReply(prompt, hf_greedy(model.base, prompt, new_tokens)) for prompt in prompts]


def test_exact_early_exit_agrees_everywhere_and_random_drafters_do_not():
    exact = make_tiny_spaf("llama", randomize=False)  # untrained adapter = plain early exit
    make_upper_identity(exact)  # ... and the full model equals early exit
    report = measure_agreement(exact, replies_of(exact, [[1, 7, 19], [4, 4, 2, 9]]), aligned_steps=2)
    assert report.first == 1.0
    assert report.positions == 2 * 24
    assert len(report.aligned) == 2 and all(0 <= value < 1 for value in report.aligned)

    noisy = make_tiny_spaf("llama", seed=4)
    assert measure_agreement(noisy, replies_of(noisy, [[1, 7, 19]])).first < 0.9


def test_s0_chain_starts_from_the_exact_top_state():
    """``aligned_s0`` differs from ``aligned`` only in its first step's top state: the exact one, as s = 0
    decoding drafts; for a kind that reads no top state the two chains are the same."""
    prompts = [[1, 7, 19], [4, 4, 2, 9]]
    plain = make_tiny_spaf("llama", seed=2)  # bottleneck: no top state
    report = measure_agreement(plain, replies_of(plain, prompts), aligned_steps=2)
    assert report.aligned_s0 == report.aligned
    fused = make_tiny_spaf("llama", seed=2, spaf_config=SpAFConfig(cutoff_layer=2, adapter_kind="fused"))
    make_upper_identity(fused)
    with torch.no_grad():
        fused.adapters["2"].out.weight.mul_(30)  # the top state weighs in the drafts
    replies = replies_of(fused, prompts)
    report = measure_agreement(fused, replies, aligned_steps=1)
    hits = count = 0
    with torch.no_grad():
        for reply in replies:
            ids = torch.tensor([reply.prompt_ids + reply.reply_ids])
            states = fused.base_features(ids)
            exact_top = torch.nn.functional.pad(states[-1][:, :-1], (0, 0, 1, 0))  # f(t-1)
            pseudo = fused.align(ids[:, 1:], states[2][:, :-1])  # ĥ(t) from h(t-1), t = 1 ..
            drafts = fused.draft_logits(pseudo, prev_top=exact_top[:, 1:]).argmax(-1)
            target = fused.lm_head_rows(states[-1]).argmax(-1)[:, 1:]
            scored = slice(len(reply.prompt_ids) - 2, -1)  # positions t whose next token is a reply token
            hits += int((drafts[:, scored] == target[:, scored]).sum())
            count += drafts[:, scored].numel()
    assert report.aligned_s0[0] == pytest.approx(hits / count)
    assert report.aligned_s0 != report.aligned


def test_cli_reports_agreement_and_tau_and_caches_replies(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("spaf_edge.models.loading.cache_dir", lambda: tmp_path / "cache")
    prompts = tmp_path / "eval.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": text, "category": "x"}) + "\n" for text in ["Hi", "Tell me"]))
    model = SpAFModel.from_pretrained(tiny_model_dir, SpAFConfig(cutoff_layer=1, adapter_layers=[1, 2]))
    model.save_spaf_components(tmp_path / "ckpt")
    args = ["--base-model", tiny_model_dir, "--components", tmp_path / "ckpt", "--prompts", prompts,
            "--max-new-tokens", 12, "--tau-prompts", 1, "--no-progress", "--out", tmp_path / "report.json"]
    result = CliRunner().invoke(agreement_command, [str(arg) for arg in args])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["num_prompts"] == 2 and [entry["exit_layer"] for entry in report["exits"]] == [1, 2]
    for entry in report["exits"]:
        assert 0 <= entry["first"] <= 1 and len(entry["aligned"]) == len(entry["aligned_s0"]) == 3
        assert entry["tau"] >= 1 and set(entry["first_by_category"]) == {"x"}
        assert 0 < entry["percent_of_base_parameters"] < 100

    def no_generation(*args, **kwargs):
        raise AssertionError("replies should come from the cache")

    monkeypatch.setattr("spaf_edge.training.distill.generate_batch", no_generation)
    again = CliRunner().invoke(agreement_command, [str(arg) for arg in args[:-2]] + ["--tau-prompts", "0"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["exits"][0]["first"] == report["exits"][0]["first"]
