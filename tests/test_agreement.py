"""Draft agreement: teacher-forced top-1 agreement of the drafters with the base's greedy token."""

from __future__ import annotations

import json

import pytest
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
        assert 0 <= entry["first"] <= 1 and len(entry["aligned"]) == 3
        assert entry["tau"] >= 1 and set(entry["first_by_category"]) == {"x"}
        assert 0 < entry["percent_of_base_parameters"] < 100

    def no_generation(*args, **kwargs):
        raise AssertionError("replies should come from the cache")

    monkeypatch.setattr("spaf_edge.training.distill.generate_batch", no_generation)
    again = CliRunner().invoke(agreement_command, [str(arg) for arg in args[:-2]] + ["--tau-prompts", "0"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["exits"][0]["first"] == report["exits"][0]["first"]
