"""``spaf-edge bench``: prompts, pairing and ratios, token equality, skipping, reports, memory.

Fake runners with a fake clock make ratios exact; one end-to-end run on a tiny random
model exercises the real runners (HF, genai when installed, the SpAF engine). No test
asserts on real timings.
"""

from __future__ import annotations

import json
import math

import pytest

from spaf_edge.bench import baselines, metrics
from spaf_edge.bench.baselines import BenchContext, RunOutput, Runner
from spaf_edge.bench.benchmark import BenchOptions, assemble_result, load_runners
from spaf_edge.bench.prompts import BenchPrompt, load_prompts, mt_bench_path
from spaf_edge.bench.report import PLOT_PNG, RESULTS_JSON, RESULTS_MD, write_report
from spaf_edge.bench.runner import measure, plan_pairs
from spaf_edge.errors import ConfigError
from spaf_edge.stats import GenerationStats


# ---- prompts --------------------------------------------------------------------
def test_packaged_mt_bench_first_turns():
    prompts = load_prompts()
    assert len(prompts) == 80
    first = json.loads(mt_bench_path().read_text().splitlines()[0])
    assert prompts[0].text == first["turns"][0] and prompts[0].category == first["category"]
    per_category = load_prompts(per_category=2)
    categories = {p.category for p in prompts}
    assert len(categories) == 8 and len(per_category) == 16
    assert all(sum(p.category == c for p in per_category) == 2 for c in categories)
    assert [p.id for p in load_prompts(per_category=2, limit=3)] == [p.id for p in per_category[:3]]


def test_prompt_file_with_both_formats(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [
        {"prompt": "plain one"},
        {"id": "x", "category": "code", "prompt": "plain two"},
        {"question_id": 7, "category": "math", "turns": ["first turn", "second turn"]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    prompts = load_prompts(path)
    assert prompts == [
        BenchPrompt("1", "all", "plain one"),
        BenchPrompt("x", "code", "plain two"),
        BenchPrompt("7", "math", "first turn"),
    ]


@pytest.mark.parametrize("line, problem", [
    ("{not json", "not valid JSON"),
    ('{"turns": []}', "no prompt text"),
    ('{"text": "wrong field"}', "no prompt text"),
    ('["a list"]', "JSON object"),
])
def test_bad_prompt_lines_are_named(tmp_path, line, problem):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(ConfigError, match=problem) as info:
        load_prompts(path)
    assert f"{path}:2" in str(info.value)


def test_missing_prompt_file_and_bad_limit(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_prompts(tmp_path / "nope.jsonl")
    with pytest.raises(ConfigError, match="--limit"):
        load_prompts(limit=0)


# ---- fake runners ---------------------------------------------------------------
class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeRunner(Runner):
    """Generates ``tokens_for(ids)`` and advances the clock by tokens / speed(ids)."""

    def __init__(self, name, clock, speed, role="baseline", sampled=False, tokens_for=None, accepted=0):
        super().__init__(BenchContext())
        self.name, self.role, self.sampled = name, role, sampled
        self.label = f"fake {name}"
        self.clock, self.speed = clock, speed
        self.tokens_for = tokens_for or (lambda ids: [ids[0] % 7 + j for j in range(6)])
        self.accepted = accepted
        self.calls = []

    def generate(self, prompt_ids, max_new_tokens, seed):
        tokens = self.tokens_for(prompt_ids)[:max_new_tokens]
        self.calls.append((list(prompt_ids), seed))
        self.clock.now += len(tokens) / self.speed(prompt_ids)
        stats = GenerationStats(prompt_tokens=len(prompt_ids), new_tokens=len(tokens), first_token_seconds=0.01)
        steps = math.ceil(len(tokens) / (1 + self.accepted))
        for _ in range(steps):
            stats.record(2, self.accepted)  # two drafts per step, ``accepted`` of them accepted
        return RunOutput(tokens, stats)


PROMPTS = [BenchPrompt(f"p{i}", "ab"[i % 2], text) for i, text in enumerate("xyzw")]
IDS = [[10, 1], [20, 2], [30, 3], [40, 4]]  # ids[0] // 10 - 1 = prompt index


def _fakes(clock, **extra):
    # SpAF is 2x the baseline on category "a" prompts and 3x on "b" prompts.
    runners = {
        "base": FakeRunner("base", clock, lambda ids: 100.0),
        "spaf": FakeRunner("spaf", clock, lambda ids: 200.0 if ids[1] % 2 else 300.0, role="spaf", accepted=1),
    }
    runners.update(extra)
    return runners


def test_ratios_come_from_pairs_with_alternating_order():
    clock = FakeClock()
    runners = _fakes(clock)
    measured = measure(PROMPTS, IDS, runners, [("spaf", "base")], max_new_tokens=5, clock=clock)
    assert [p.speedup for p in measured.pairs] == pytest.approx([2.0, 3.0, 2.0, 3.0])
    assert [p.runner_first for p in measured.pairs] == [True, False, True, False]
    order = [(r.runner, r.prompt_index) for r in measured.runs]
    assert order == [
        ("spaf", 0), ("base", 0), ("base", 1), ("spaf", 1), ("spaf", 2), ("base", 2), ("base", 3), ("spaf", 3),
    ]
    assert all(r.new_tokens == 5 and r.pair == "spaf/base" for r in measured.runs)
    summary = metrics.summarize_pairs(measured.pairs)[0]
    assert summary["speedup"] == pytest.approx(math.sqrt(6.0))
    assert summary["by_category"] == pytest.approx({"a": 2.0, "b": 3.0})
    assert (summary["speedup_min"], summary["speedup_max"]) == pytest.approx((2.0, 3.0))
    spaf = metrics.summarize_runner([r for r in measured.runs if r.runner == "spaf"])
    assert spaf["tau"] == pytest.approx(5 / 3)  # 5 tokens in ceil(5 / 2) = 3 steps
    assert spaf["acceptance_by_position"] == pytest.approx([1.0, 0.0])
    assert spaf["tokens_per_second"] == pytest.approx(20 / (10 / 200 + 10 / 300))
    # first tokens come 0.01 s after the start: 4 runs x 4 later tokens over the remaining time
    assert spaf["decode_tokens_per_second"] == pytest.approx(16 / (10 / 200 + 10 / 300 - 4 * 0.01))


def test_every_runner_gets_the_same_ids_and_seed_per_prompt():
    clock = FakeClock()
    runners = _fakes(clock, solo=FakeRunner("solo", clock, lambda ids: 50.0))
    measure(PROMPTS, IDS, runners, [("spaf", "base")], max_new_tokens=4, seed=11, warmup_tokens=0, clock=clock)
    expected = [(ids, 11 + i) for i, ids in enumerate(IDS)]
    assert runners["solo"].calls == expected  # not in a pair: once per prompt
    assert runners["base"].calls == expected and runners["spaf"].calls == expected


def test_pair_plan():
    clock = FakeClock()
    runners = {
        "hf": FakeRunner("hf", clock, None),
        "engine-greedy": FakeRunner("engine-greedy", clock, None),
        "spaf": FakeRunner("spaf", clock, None, role="spaf"),
        "spaf-sample": FakeRunner("spaf-sample", clock, None, role="spaf", sampled=True),
    }
    assert plan_pairs(runners) == [("spaf", "hf"), ("spaf", "engine-greedy"), ("spaf-sample", "engine-greedy")]
    runners["engine-sample"] = FakeRunner("engine-sample", clock, None, sampled=True)
    assert plan_pairs(runners)[-1] == ("spaf-sample", "engine-sample")
    runners["engine-greedy"].parity_with = ("genai", "optimum")  # optimum absent: no pair
    runners["genai"] = FakeRunner("genai", clock, None)
    assert plan_pairs(runners)[-3:] == [("spaf", "genai"), ("spaf-sample", "engine-sample"), ("engine-greedy", "genai")]


def test_token_difference_is_flagged():
    clock = FakeClock()
    honest = FakeRunner("honest", clock, None).tokens_for
    liar = FakeRunner("liar", clock, lambda ids: 100.0,
                      tokens_for=lambda ids: [ids[0] % 7, 99, 2, 3, 4, 5] if ids[0] == 30 else honest(ids))
    runners = _fakes(clock, liar=liar)
    measured = measure(PROMPTS, IDS, runners, [("spaf", "base")], max_new_tokens=6, clock=clock)
    report = metrics.check_equality(measured.runs, "base", ["spaf", "liar"])
    assert report["runners"]["spaf"] == {"equal": 4, "total": 4, "mismatches": []}
    liar_check = report["runners"]["liar"]
    assert (liar_check["equal"], liar_check["total"]) == (3, 4)
    assert liar_check["mismatches"][0]["prompt_id"] == "p2" and liar_check["mismatches"][0]["first_difference"] == 1
    assert metrics.first_difference([1, 2], [1, 2, 3]) == 2


def test_missing_baselines_are_skipped_with_a_note(monkeypatch):
    class NotInstalled(Runner):
        name = "not-installed"
        label = "needs a package that is not there"
        requires = ("spaf_edge_no_such_module",)
        install_hint = "pip install it"

    monkeypatch.setitem(baselines._REGISTRY, NotInstalled.name, NotInstalled)
    context = BenchContext(base_model=None, export_dir=None, precision="fp16")
    runners, skipped = load_runners(["not-installed", "hf", "genai", "spaf"], context, {}, lambda line: None)
    assert runners == {}
    assert "spaf_edge_no_such_module not installed; pip install it" in skipped["not-installed"]["note"]
    assert "--base-model" in skipped["hf"]["note"] or "not installed" in skipped["hf"]["note"]
    assert "export" in skipped["spaf"]["note"] or "not installed" in skipped["spaf"]["note"]
    assert all(entry["status"] == "skipped" for entry in skipped.values())
    from spaf_edge.bench.genai_model import unsupported_reason

    assert "fp16" in unsupported_reason("fp16", "cpu") and unsupported_reason("fp32", "CPUExecutionProvider") is None


def test_report_files_are_written_and_well_formed(tmp_path, monkeypatch):
    clock = FakeClock()
    runners = _fakes(clock)
    measured = measure(PROMPTS, IDS, runners, [("spaf", "base")], max_new_tokens=5, clock=clock)
    options = BenchOptions(name="fake", runners=["base", "spaf", "missing"], precision="fp32")
    skipped = {"missing": {"status": "skipped", "note": "not installed here"}}
    machine = {"cpu": "test cpu", "packages": {}, "provider": "cpu", "threads": 1}
    memory = {"base": {"peak_rss_mb": 100.0, "start_rss_mb": 20.0, "delta_mb": 80.0, "new_tokens": 5}}
    missing = type("Missing", (Runner,), {"name": "missing", "label": "absent"})
    monkeypatch.setitem(baselines._REGISTRY, "missing", missing)
    result = assemble_result(options, machine, BenchContext(), PROMPTS, IDS, runners, skipped, measured, memory)
    out = write_report(result, tmp_path / "fake")
    loaded = json.loads((out / RESULTS_JSON).read_text())
    assert loaded["runners"]["missing"]["status"] == "skipped"
    assert loaded["pairs"][0]["speedup"] == pytest.approx(math.sqrt(6.0))
    assert loaded["equality"]["reference"] == "base" and loaded["equality"]["runners"]["spaf"]["equal"] == 4
    assert len(loaded["runs"]) == 8 and len(loaded["prompts"]) == 4
    markdown = (out / RESULTS_MD).read_text()
    assert "| `spaf` | `base` | 4 | **2.45×** |" in markdown
    assert "100 (Δ 80)" in markdown and "**missing** (skipped): not installed here" in markdown
    table = [line for line in markdown.splitlines() if line.startswith("| `")]
    assert all(line.count("|") == table[0].count("|") for line in table[:2])
    pytest.importorskip("matplotlib")
    assert (out / PLOT_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class MemoryHog(Runner):
    """Holds 64 MiB after loading (for the fresh-process memory measurement)."""

    name = "memory-hog"

    def load(self):
        self.block = bytearray(64 * 2**20)
        self.block[:: 4096] = b"x" * len(self.block[:: 4096])  # touch every page

    def generate(self, prompt_ids, max_new_tokens, seed):
        tokens = list(prompt_ids)[:max_new_tokens]
        return RunOutput(tokens, GenerationStats(new_tokens=len(tokens)))


def test_memory_is_measured_in_a_fresh_process(monkeypatch):
    from pathlib import Path

    from spaf_edge.bench.memory import measure_memory

    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))
    ballast = bytearray(256 * 2**20)  # this process's peak must not leak into the worker's figure
    ballast[:: 4096] = b"x" * len(ballast[:: 4096])
    figures = measure_memory("test_bench:MemoryHog", BenchContext().to_dict(), [5, 6, 7], 2, timeout=120)
    del ballast
    assert figures["new_tokens"] == 2
    assert 60 <= figures["delta_mb"] < 200 and figures["peak_rss_mb"] >= figures["start_rss_mb"] + 60
    assert figures["peak_rss_mb"] < 250
    broken = measure_memory("no_such_module_xyz:Runner", BenchContext().to_dict(), [1], 1, timeout=120)
    assert "no_such_module_xyz" in broken["error"]


# ---- end to end on a tiny model ---------------------------------------------------
@pytest.fixture
def exportable_model_dir(tmp_path):
    """A saved tiny random Llama with head_dim 16 (exportable) and a character tokenizer."""
    from conftest import make_tiny_base, make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()
    model = make_tiny_base("llama", hidden_size=64, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    folder = tmp_path / "tiny_model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_bench_command_end_to_end_on_a_tiny_model(exportable_model_dir, tmp_path, monkeypatch):
    """Real runners on a tiny random Llama: every greedy runner reproduces HF's tokens."""
    from click.testing import CliRunner

    from spaf_edge.cli import main

    monkeypatch.setenv("SPAF_EDGE_CACHE", str(tmp_path / "cache"))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": t, "category": c}) for t, c in [
        ("Hello there, how are you?", "chat"), ("Count: 1, 2, 3", "math"), ("Write a poem.", "chat"),
    ]))
    args = [
        "bench", "--base-model", str(exportable_model_dir), "--prompts", str(prompts), "--max-new-tokens", "12",
        "--threads", "1", "--runners", "hf,genai,optimum,engine-greedy,spaf,spaf-sample", "--no-memory",
        "--name", "tiny", "--output-dir", str(tmp_path / "results"),
    ]
    outcome = CliRunner().invoke(main, args)
    assert outcome.exit_code == 0, outcome.output
    result = json.loads((tmp_path / "results" / "tiny" / RESULTS_JSON).read_text())
    runners = result["runners"]
    for name in ("hf", "engine-greedy", "spaf", "spaf-sample"):
        assert runners[name]["status"] == "measured", runners[name]
    for name, module in (("genai", "onnxruntime_genai"), ("optimum", "optimum.onnxruntime")):
        installed = baselines._importable(module)
        assert runners[name]["status"] == ("measured" if installed else "skipped"), runners[name]
        assert installed or f"{module} not installed" in runners[name]["note"]
    assert result["equality"]["reference"] == "hf"
    for name, check in result["equality"]["runners"].items():
        assert check["equal"] == check["total"] > 0, (name, check["mismatches"])
    pairs = {(p["runner"], p["baseline"]) for p in result["pairs"]}
    assert {("spaf", "hf"), ("spaf", "engine-greedy"), ("spaf-sample", "engine-greedy")} <= pairs
    assert (("engine-greedy", "genai") in pairs) == (runners["genai"]["status"] == "measured")
    assert all(p["prompts"] == 3 for p in result["pairs"])
    assert result["settings"]["categories"] == ["chat", "math"]
    assert len(runners["spaf"]["acceptance_by_position"]) == 5  # the export's default num_draft_tokens
