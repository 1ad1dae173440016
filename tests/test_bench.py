"""``spaf-edge bench``: prompts, pairing and ratios, token equality, skipping, reports, memory.

Fake runners with a fake clock make ratios exact; one end-to-end run on a tiny random
model exercises the real runners (HF, genai and its n-gram speculation when installed,
the SpAF engine). The genai and llama.cpp runners are also driven through stand-ins of
their libraries, so their logic is tested where the libraries are absent. No test
asserts on real timings.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import types
from importlib.machinery import ModuleSpec
from pathlib import Path

import pytest

from spaf_edge.bench import baselines, exports, metrics
from spaf_edge.bench.baselines import BenchContext, Runner, RunOutput
from spaf_edge.bench.benchmark import BenchOptions, assemble_result, load_runners
from spaf_edge.bench.report import PLOT_PNG, RESULTS_JSON, RESULTS_MD, write_report
from spaf_edge.bench.runner import measure, plan_pairs
from spaf_edge.core.errors import ConfigError
from spaf_edge.core.prompt_sets import BenchPrompt, load_prompts, mt_bench_path
from spaf_edge.core.stats import GenerationStats


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
    assert report["runners"]["spaf"] == {"reference": "base", "equal": 4, "total": 4, "mismatches": []}
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


def test_speculative_runners_are_checked_against_their_own_plain_greedy():
    """A quantized runtime's plain greedy may differ from the reference; its speculative mode must not
    differ from that plain greedy, and that is what the report checks for it."""
    clock = FakeClock()
    exact = FakeRunner("hf", clock, lambda ids: 100.0).tokens_for
    drifted = lambda ids: [ids[0] % 7, 42, 2, 3, 4, 5] if ids[0] == 30 else exact(ids)  # noqa: E731
    runners = _fakes(
        clock, hf=FakeRunner("hf", clock, lambda ids: 100.0),
        plainq=FakeRunner("plainq", clock, lambda ids: 100.0, tokens_for=drifted),
        specq=FakeRunner("specq", clock, lambda ids: 150.0, tokens_for=drifted),
    )
    runners["specq"].reference = "plainq"
    runners["specq"].parity_with = ("plainq",)
    measured = measure(PROMPTS, IDS, runners, plan_pairs(runners), max_new_tokens=6, clock=clock)
    options = BenchOptions(name="own", runners=list(runners))
    machine = {"cpu": "test cpu", "packages": {}, "provider": "cpu", "threads": 1}
    result = assemble_result(options, machine, BenchContext(), PROMPTS, IDS, runners, {}, measured, {})
    checks = result["equality"]["runners"]
    assert result["equality"]["reference"] == "hf"
    assert (checks["plainq"]["reference"], checks["plainq"]["equal"], checks["plainq"]["total"]) == ("hf", 6, 8)
    assert (checks["specq"]["reference"], checks["specq"]["equal"], checks["specq"]["total"]) == ("plainq", 8, 8)
    assert checks["spaf"]["reference"] == "hf"  # a fake without its own reference
    markdown = write_report(result, Path(tempfile.mkdtemp()) / "own", plot=False) / RESULTS_MD
    text = markdown.read_text()
    assert "- `specq` vs `plainq`: 8/8 runs identical (identical)" in text
    assert "- `plainq` vs `hf`: 6/8 runs identical (**DIFFERENT**)" in text


def test_quantize_option_is_checked(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from spaf_edge.cli import main
    from spaf_edge.core.manifest import Manifest

    with pytest.raises(ConfigError, match="--quantize 'int3'"):
        BenchOptions(quantization="int3").validate()
    assert BenchOptions(quantization="none").quantization is None
    monkeypatch.setattr(Manifest, "load", classmethod(lambda cls, folder, verify_files=True:
                                                      types.SimpleNamespace(quantization="int4")))
    for given, shown in ((["--quantize", "int8"], "asks for --quantize int8"), ([], "asks for --quantize none")):
        outcome = CliRunner().invoke(main, ["bench", "--export-dir", str(tmp_path), *given, "--no-memory"])
        assert outcome.exit_code == 1, outcome.output
        assert "exported with --quantize int4" in outcome.output and shown in outcome.output
        assert "pass --quantize int4" in outcome.output and "Traceback" not in outcome.output


def test_quantization_reaches_the_exports_the_names_and_the_report(monkeypatch, tmp_path):
    """The genai build and the SpAF export are made (and cached) per precision; the name and report say it."""
    import subprocess

    import spaf_edge.exporters
    import spaf_edge.model
    from spaf_edge.bench import genai_model
    from spaf_edge.bench.exports import cached_export

    monkeypatch.setenv("SPAF_EDGE_CACHE", str(tmp_path / "cache"))
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"max_position_embeddings": 4096}))
    commands = []

    def fake_builder(command, **kwargs):
        commands.append(command)
        out = Path(command[command.index("-o") + 1])
        (out / "genai_config.json").write_text("{}")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(genai_model.subprocess, "run", fake_builder)
    folders = [genai_model.build_genai_model(base, "fp32", "cpu", q) for q in (None, "int4", "int8", "int4")]
    assert [c[c.index("-p") + 1] for c in commands] == ["fp32", "int4", "int8"]  # the second int4 is cached
    assert folders[1] == folders[3] and len(set(folders)) == 3 and "int4" in folders[1].name
    assert genai_model.unsupported_reason("fp16", "cpu", "int4") is None
    assert "int8" in genai_model.unsupported_reason("fp32", "dml", "int8")

    exported = []
    monkeypatch.setattr(spaf_edge.model.SpAFModel, "from_pretrained", classmethod(lambda cls, *a, **k: "model"))

    def fake_export(model, out, **kwargs):
        exported.append(kwargs)
        out.mkdir(parents=True)

    monkeypatch.setattr(spaf_edge.exporters, "export_model", fake_export)
    plain, int4 = (cached_export(base, None, "fp32", 2048, q) for q in (None, "int4"))
    assert [k["quantization"] for k in exported] == [None, "int4"] and plain != int4

    clock = FakeClock()
    runners = _fakes(clock)
    measured = measure(PROMPTS, IDS, runners, [("spaf", "base")], max_new_tokens=5, clock=clock)
    options = BenchOptions(runners=["base", "spaf"], quantization="int4")
    machine = {"cpu": "test cpu", "packages": {}, "provider": "cpu", "threads": 1}
    context = BenchContext(base_model=str(base), quantization="int4")
    result = assemble_result(options, machine, context, PROMPTS, IDS, runners, {}, measured, {})
    assert result["name"].startswith("base-fp32-int4-cpu-") and result["settings"]["quantization"] == "int4"
    markdown = (write_report(result, tmp_path / "r", plot=False) / RESULTS_MD).read_text()
    assert "| weight quantization | int4 |" in markdown


def _fake_genai(monkeypatch, tmp_path, stats):
    """An ``onnxruntime_genai`` stand-in: 10, 11, 12, ... and the given speculative stats."""
    from spaf_edge.bench import genai_model

    calls = {"speculative": []}

    class Params:
        def __init__(self, model):
            pass

        def set_search_options(self, **options):
            calls["search"] = options

        def set_speculative_options(self, **options):
            calls["speculative"].append(options)

    class Generator:
        def __init__(self, model, params):
            self.tokens = []

        def append_tokens(self, ids):
            calls["prompt"] = ids.tolist()

        def is_done(self):
            return False

        def generate_next_token(self):
            self.tokens.append(10 + len(self.tokens))

        def get_next_tokens(self):
            return [self.tokens[-1]]

        def get_speculative_stats(self):
            return stats

    config = types.SimpleNamespace(overlay=lambda text: None)
    fake = types.SimpleNamespace(GeneratorParams=Params, Generator=Generator, Model=lambda cfg: "model",
                                 Config=lambda folder: config)
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", fake)
    monkeypatch.setattr(genai_model, "build_genai_model", lambda *args: tmp_path)
    return calls


def test_genai_ngram_uses_genai_speculation_and_reports_its_passes(monkeypatch, tmp_path):
    stats = {"target_forward_passes": 3, "standard_fallback_steps": 2, "draft_tokens_evaluated": 8,
             "draft_tokens_accepted": 5, "rounds": 2, "ngram_lookup_hits": 2, "ngram_lookup_misses": 2}
    calls = _fake_genai(monkeypatch, tmp_path, stats)
    context = BenchContext(base_model=str(tmp_path), eos_token_ids=[99], quantization="int4")
    plain, ngram = baselines.GenaiGreedy(context), baselines.GenaiNgram(context)
    plain.load()
    ngram.load()
    assert plain.model is ngram.model  # one genai model for both rows
    out = plain.generate([1, 2], 8, 0)
    assert calls["speculative"] == [] and out.speculation is None and out.stats.verify_steps == 8
    out = ngram.generate([1, 2], 8, 0)
    assert calls["speculative"] == [{"ngram_size": 3, "max_draft_tokens": 4}]
    assert out.tokens == list(range(10, 18)) and calls["prompt"] == [[1, 2]]
    assert out.speculation == {"forward_passes": 5, "drafted": 8, "accepted": 5, "rounds": 2,
                               "lookup_hits": 2, "lookup_misses": 2}
    assert out.stats.verify_steps == 6 and out.stats.tau == pytest.approx(8 / 6)  # the prefill + 5 passes
    assert ngram.reference == "genai" and "genai" in ngram.parity_with


def _fake_llama_cpp(monkeypatch):
    """A ``llama_cpp`` stand-in that generates like llama-cpp-python: one ``eval`` for the prompt, then one
    per step on the last token and its drafts; the tokens sampled from a step are the accepted drafts
    and one more. The model's greedy continuation of ``seq`` is ``(seq[-1] * 3 + 1) % 50``."""
    truth = lambda seq: (seq[-1] * 3 + 1) % 50  # noqa: E731

    class Lookup:
        def __init__(self, max_ngram_size, num_pred_tokens):
            self.settings = (max_ngram_size, num_pred_tokens)

        def __call__(self, input_ids):  # two right drafts, then a wrong one
            first = truth(list(input_ids))
            return np.array([first, truth([first]), 49])

    class Llama:
        instances = []

        def __init__(self, model_path, draft_model=None, **settings):
            self.path, self.draft_model, self.settings = model_path, draft_model, settings
            self.resets = 0
            self.evals = []
            Llama.instances.append(self)

        def reset(self):
            self.resets += 1

        def eval(self, tokens):
            self.evals.append(list(tokens))

        def generate(self, tokens, **sampling):
            self.sampling = sampling
            seq = list(tokens)
            self.eval(seq)
            while True:
                token = truth(seq)  # from the last eval's logits
                seq.append(token)
                yield token
                drafts = [int(d) for d in self.draft_model(np.array(seq))] if self.draft_model else []
                self.eval([token, *drafts])
                for draft in drafts:
                    if draft != truth(seq):
                        break
                    seq.append(draft)
                    yield draft

    np = pytest.importorskip("numpy")
    module = types.ModuleType("llama_cpp")
    module.__spec__ = ModuleSpec("llama_cpp", None)
    module.Llama = Llama
    speculative = types.ModuleType("llama_cpp.llama_speculative")
    speculative.LlamaPromptLookupDecoding = Lookup
    monkeypatch.setitem(sys.modules, "llama_cpp", module)
    monkeypatch.setitem(sys.modules, "llama_cpp.llama_speculative", speculative)
    return Llama


def test_llamacpp_runners_on_a_stand_in(monkeypatch, tmp_path):
    from spaf_edge.bench.benchmark import gguf_of

    gguf = tmp_path / "model.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")
    base = tmp_path / "base"
    base.mkdir()
    assert gguf_of(base) is None
    (base / "spaf_source.json").write_text(json.dumps({"gguf": str(gguf)}))
    assert gguf_of(base) == str(gguf)
    if not baselines._importable("llama_cpp"):
        reason = baselines.LlamacppGreedy.unavailable_reason(BenchContext(gguf=str(gguf)))
        assert "llama_cpp not installed; pip install llama-cpp-python" in reason
    Llama = _fake_llama_cpp(monkeypatch)
    assert "no GGUF" in baselines.LlamacppLookup.unavailable_reason(BenchContext())
    context = BenchContext(gguf=gguf_of(base), threads=2, max_length=300, eos_token_ids=[99])
    plain, lookup = baselines.LlamacppGreedy(context), baselines.LlamacppLookup(context)
    plain.load()
    lookup.load()
    assert plain.model.draft_model is None and lookup.model.draft_model.settings == (2, 10)
    assert plain.model.settings["n_ctx"] == 300 and plain.model.settings["n_threads"] == 2
    assert "model.Q4_1.gguf" in plain.label
    want = plain.generate([4, 5], 7, 0)
    assert plain.model.sampling["temp"] == 0.0 and plain.model.resets == 1
    assert want.speculation is None and want.stats.verify_steps == 7 and len(plain.model.evals) == 7
    out = lookup.generate([4, 5], 7, 0)
    assert out.tokens == want.tokens
    # the prefill gives token 1; each of two steps verifies 3 drafts, accepts 2 and adds 1 token
    assert out.stats.verify_steps == 3 and out.stats.tau == pytest.approx(7 / 3)
    assert (out.stats.drafted, out.stats.accepted) == ([2, 2, 2], [2, 2, 0])
    assert out.speculation == {"forward_passes": 2, "drafted": 6, "accepted": 4}
    again = lookup.generate([4, 5], 7, 0)  # counters start afresh each run
    assert again.speculation == out.speculation and lookup.model.resets == 2
    assert len(Llama.instances) == 2 and lookup.reference == "llamacpp"


@pytest.mark.skipif(not baselines._importable("onnxruntime_genai"), reason="onnxruntime-genai not installed")
def test_genai_int8_build_has_8_bit_weights(exportable_model_dir, tmp_path, monkeypatch):
    """What ``--quantize int8`` means for genai: its builder's ``-p int8``, MatMulNBits with 8 bits."""
    import onnx

    from spaf_edge.bench.genai_model import build_genai_model

    monkeypatch.setenv("SPAF_EDGE_CACHE", str(tmp_path / "cache"))
    folder = build_genai_model(exportable_model_dir, "fp32", "cpu", "int8")
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    bits = {a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"}
    assert bits == {8} and not any(n.op_type == "MatMul" for n in graph.node)


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
        "--threads", "1", "--runners", "hf,genai,genai-ngram,optimum,llamacpp,engine-greedy,spaf,spaf-sample",
        "--no-memory",
        "--name", "tiny", "--output-dir", str(tmp_path / "results"),
    ]
    outcome = CliRunner().invoke(main, args)
    assert outcome.exit_code == 0, outcome.output
    result = json.loads((tmp_path / "results" / "tiny" / RESULTS_JSON).read_text())
    runners = result["runners"]
    for name in ("hf", "engine-greedy", "spaf", "spaf-sample"):
        assert runners[name]["status"] == "measured", runners[name]
    for name, module in (("genai", "onnxruntime_genai"), ("genai-ngram", "onnxruntime_genai"),
                         ("optimum", "optimum.onnxruntime")):
        installed = baselines._importable(module)
        assert runners[name]["status"] == ("measured" if installed else "skipped"), runners[name]
        assert installed or f"{module} not installed" in runners[name]["note"]
    assert runners["llamacpp"]["status"] == "skipped"  # not installed, or no GGUF for this base
    assert result["equality"]["reference"] == "hf"
    for name, check in result["equality"]["runners"].items():
        assert check["equal"] == check["total"] > 0, (name, check["mismatches"])
    assert result["equality"]["runners"]["spaf"]["reference"] == "engine-greedy"
    if runners["genai-ngram"]["status"] == "measured":
        assert result["equality"]["runners"]["genai-ngram"]["reference"] == "genai"
        assert runners["genai-ngram"]["speculation"]["forward_passes"] > 0
    pairs = {(p["runner"], p["baseline"]) for p in result["pairs"]}
    assert {("spaf", "hf"), ("spaf", "engine-greedy"), ("spaf-sample", "engine-greedy")} <= pairs
    assert (("engine-greedy", "genai") in pairs) == (runners["genai"]["status"] == "measured")
    assert all(p["prompts"] == 3 for p in result["pairs"])
    assert result["settings"]["categories"] == ["chat", "math"]
    assert len(runners["spaf"]["acceptance_by_position"]) == 5  # the export's default num_draft_tokens
    # the report says what each engine row ran with
    assert runners["spaf"]["settings"].startswith("spaf+lookup, N=5 s=")
    assert runners["spaf-sample"]["settings"].endswith("temperature 0.7, top-p 0.9")
    assert runners["engine-greedy"]["settings"] == "plain greedy" and runners["hf"]["settings"] is None
    assert f"- `spaf`: {runners['spaf']['settings']}" in (tmp_path / "results" / "tiny" / RESULTS_MD).read_text()


def test_cached_exports_depend_on_every_source_the_exporter_writes_with():
    """The export cache's key hashes the files the exporter's output depends on: the manifest and IO
    names (core/), the exporters, modules and architectures; every listed file exists."""
    root = Path(exports.__file__).resolve().parents[1]
    sources = exports.exporter_sources()
    assert all(file.is_file() for file in sources)
    for needed in ("core/manifest.py", "core/io_names.py", "core/embedding_layout.py", "exporters/layers.py",
                   "modules/drafters.py", "models/registry.py", "model.py"):
        assert root / needed in sources, needed


def test_concurrent_cached_builds_build_once(tmp_path, monkeypatch):
    """Two callers that need the same cached build at once (two distill shards, say) get one build:
    the second waits on the build lock and then finds the first's folder."""
    import threading
    import time

    from spaf_edge.bench.cache import cached_folder

    monkeypatch.setenv("SPAF_EDGE_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "model"
    source.mkdir()
    (source / "config.json").write_text("{}")
    builds, results = [], []

    def build(folder):
        builds.append(folder)
        time.sleep(0.5)  # long enough for the other caller to arrive while this one builds
        (folder / "weights.bin").write_bytes(b"x")

    def call():
        results.append(cached_folder("exports", source, "fp32", build, max_length=64))

    callers = [threading.Thread(target=call) for _ in range(2)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    assert len(builds) == 1 and len(results) == 2 and results[0] == results[1]
    assert (results[0] / "weights.bin").read_bytes() == b"x"
