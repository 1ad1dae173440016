"""``spaf-edge tune``: it stores a valid ``tuned`` entry, the engine and ``run`` take it as their
defaults, greedy output stays the base model's, ``--reset`` removes it, bad inputs fail clearly.

The tiny export has identity upper layers and random adapters, so drafts are accepted
in runs of mixed length and every acceptance path runs. Timings of a tiny model mean
nothing, so no test asserts which setting wins; they assert how the winner is chosen,
stored and used.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import make_tiny_spaf, make_tiny_tokenizer
from test_reference_generation import make_upper_identity

from spaf_edge.cli import main
from spaf_edge.core.errors import ConfigError, ContextLengthError, ModelNotFoundError
from spaf_edge.core.io_names import MANIFEST
from spaf_edge.core.manifest import Manifest
from spaf_edge.core.prompt_sets import load_prompts, mt_bench_path
from spaf_edge.exporters import export_model
from spaf_edge.runtime import Engine
from spaf_edge.runtime.tuning import (
    DRAFTING_KEYS,
    Candidate,
    Grid,
    TuneOptions,
    calibration_prompts_path,
    reset_tuned,
    tune_export,
    tune_exports,
    write_tuned,
)
from spaf_edge.validation.end_to_end import base_greedy

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS = ["Hi there", "Why is the sky blue?", "Count to ten.", "Name three colours."]
SMALL_GRID = Grid(num_draft_tokens=(1, 3, 5), transitions=(1, 2), thresholds=(None, 0.4))  # 10 settings


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model, export folder, prompt file)."""
    root = tmp_path_factory.mktemp("tune")
    model = make_tiny_spaf("llama", seed=4, hidden_size=64)
    make_upper_identity(model)
    model.tokenizer = make_tiny_tokenizer()
    folder = export_model(model, root / "export", progress=False)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": text}) + "\n" for text in PROMPTS))
    return model, folder, prompts


@pytest.fixture
def export_copy(tiny, tmp_path):
    return Path(shutil.copytree(tiny[1], tmp_path / "export"))


def options(prompts, **overrides) -> TuneOptions:
    settings = dict(prompts=prompts, max_new_tokens=12, grid=SMALL_GRID, progress=False, threads=1)
    return TuneOptions(**{**settings, **overrides})


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def manifest_data(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text())


# ---- the stored result ----------------------------------------------------------
def test_tune_stores_the_fastest_finalist_and_the_engine_uses_it(tiny, export_copy):
    result = tune_export(export_copy, options(tiny[2]))
    tuned = Manifest.load(export_copy).tuned  # sha256 of every file still verifies
    assert tuned == manifest_data(export_copy)["tuned"] == result.tuned

    chosen = Candidate(**{key: tuned[key] for key in DRAFTING_KEYS})
    drafting = Candidate(chosen.num_draft_tokens, chosen.serial_parallel_transition, chosen.draft_stop_threshold)
    assert drafting in SMALL_GRID.candidates() or drafting == result.default.candidate
    assert result.chosen.candidate == chosen
    assert result.chosen is max(result.finals, key=lambda row: row.tokens_per_second)
    # Successive halving: 10 settings screened on 2 prompts, ceil(10 / 4) = 3 (+ the defaults) on all 4;
    # then the fastest with the 6 other ways of combining the proposers, on all 4.
    assert result.screened == 10 and len(result.finals) in (3 + 6, 4 + 6)
    assert {row.candidate.proposers for row in result.finals} == {"spaf", "lookup", "spaf+lookup"}
    assert all(row.runs == len(PROMPTS) for row in [*result.finals, result.plain_greedy])
    assert result.default.candidate == Candidate(5, 2, None)  # the export's SpAF config
    assert tuned["speedup_vs_plain_greedy"] == pytest.approx(
        tuned["tokens_per_second"] / tuned["plain_greedy_tokens_per_second"], rel=1e-2)
    assert tuned["speedup_vs_default"] == pytest.approx(
        tuned["tokens_per_second"] / tuned["default"]["tokens_per_second"], rel=1e-2)
    assert tuned["speedup_vs_default"] >= 1.0  # the defaults run in the final round: never beaten by the choice
    assert tuned["provider"] == "cpu" and tuned["threads"] == 1 and tuned["device"]
    assert tuned["exit_layer"] == 2 and tuned["calibration"]["num_prompts"] == len(PROMPTS)
    assert tuned["calibration"]["greedy_mismatches"] == result.mismatches == 0
    assert "*" in result.table() and "plain greedy" in result.table()
    result.finals[-1].label += " spaf+lookup m=3 copy=2..8"  # wider than the setting column
    assert len({len(line) for line in result.table().splitlines()}) == 1  # the columns stay aligned

    engine = Engine.from_folder(export_copy)
    settings = engine.settings()
    assert (settings.num_draft_tokens, settings.serial_parallel_transition, settings.draft_stop_threshold,
            "+".join(settings.proposers), settings.lookup_min_match, settings.lookup_start, settings.lookup_depth) == (
        chosen.num_draft_tokens, chosen.serial_parallel_transition, chosen.draft_stop_threshold, chosen.proposers,
        chosen.lookup_min_match, chosen.lookup_start, chosen.lookup_depth)
    assert engine.settings(num_draft_tokens=2, serial_parallel_transition=1).num_draft_tokens == 2  # options win


def test_retuning_ignores_the_stored_entry(tiny, export_copy):
    """Every run passes all drafting settings explicitly: a stored result must not leak into the next search."""
    grid = Grid(num_draft_tokens=(3,), transitions=(1,), thresholds=(None,))

    def taus():  # greedy tau is deterministic for a setting, whatever the timing
        result = tune_export(export_copy, options(tiny[2], grid=grid))
        return {row.label: row.tau for row in result.finals if row.label in ("N=3 s=1 eta=-", "N=5 s=2 eta=-")}

    fresh = taus()
    assert set(fresh) == {"N=3 s=1 eta=-", "N=5 s=2 eta=-"} and max(fresh.values()) > 1.0
    write_tuned(export_copy, {"num_draft_tokens": 1, "serial_parallel_transition": 1, "draft_stop_threshold": 0.99})
    assert taus() == fresh


@pytest.mark.parametrize("setting", [Candidate(4, 1, None, "spaf"), Candidate(6, 3, 0.3, "spaf"),
                                     Candidate(2, 2, None, "spaf"), Candidate(3, 1, None, "spaf+lookup", 1)])
def test_tuned_export_gives_plain_greedy_tokens(tiny, export_copy, setting):
    model = tiny[0]
    write_tuned(export_copy, {**setting.to_dict(), "tokens_per_second": 1.0})
    engine = Engine.from_folder(export_copy)
    eos = sorted(engine.eos)
    for text in PROMPTS:
        tuned = engine.generate(text, max_new_tokens=24)
        plain = engine.generate(text, max_new_tokens=24, mode="greedy")
        assert tuned.tokens == plain.tokens == base_greedy(model.base, tuned.prompt_ids, 24, eos)
        if setting.proposers != "spaf":  # lookup chains go deeper than N
            continue
        assert len(tuned.stats.drafted) <= setting.num_draft_tokens
        if setting.draft_stop_threshold is None:  # every step drafts N (or what the budget leaves)
            assert len(tuned.stats.drafted) == setting.num_draft_tokens


def test_run_uses_the_tuned_setting_until_reset(tiny, export_copy):
    result = invoke("tune", export_copy, "--prompts", tiny[2], "--max-new-tokens", 8, "--draft-tokens", "3",
                    "--transitions", "1", "--thresholds", "none", "--threads", 1, "--no-progress")
    assert result.exit_code == 0, result.output
    assert "Chosen N=" in result.output and "over plain greedy" in result.output
    tuned = manifest_data(export_copy)["tuned"]
    # One setting besides the defaults (N=5 s=2): either may win; run must use the stored one.
    assert (tuned["num_draft_tokens"], tuned["serial_parallel_transition"]) in ((3, 1), (5, 2))

    def drafted_per_step():
        run = invoke("run", export_copy, "--prompt", "Hi", "--max-new-tokens", 20, "--json-output",
                     "--proposers", "spaf")  # SpAF's chains only: N drafts per step
        assert run.exit_code == 0, run.output
        return len(json.loads(run.stdout)["stats"]["drafted"])

    write_tuned(export_copy, {**tuned, "num_draft_tokens": 3, "serial_parallel_transition": 1})
    assert drafted_per_step() == 3
    reset = invoke("tune", export_copy, "--reset")
    assert reset.exit_code == 0 and "removed" in reset.output
    assert manifest_data(export_copy)["tuned"] is None
    assert drafted_per_step() == 5  # the SpAF config's default again
    Manifest.load(export_copy)  # still a valid export
    assert "no tuning result" in invoke("tune", export_copy, "--reset").output
    assert reset_tuned(export_copy) is False


def test_exports_of_several_exits_are_compared(tiny, tmp_path):
    first = Path(shutil.copytree(tiny[1], tmp_path / "a"))
    second = Path(shutil.copytree(tiny[1], tmp_path / "b"))
    grid = Grid(num_draft_tokens=(2,), transitions=(1,), thresholds=(None,))
    results = tune_exports([first, second], options(tiny[2], grid=grid, limit=2))
    assert sorted(r.folder for r in results) == [first, second]
    assert results[0].chosen.tokens_per_second >= results[1].chosen.tokens_per_second
    assert all(manifest_data(folder)["tuned"] is not None for folder in (first, second))

    other = make_tiny_spaf("llama", seed=9, hidden_size=64)
    other.tokenizer = make_tiny_tokenizer()
    third = export_model(other, tmp_path / "c", progress=False)
    with pytest.raises(ConfigError, match="different base models"):
        tune_exports([first, third], options(tiny[2], grid=grid))


# ---- calibration prompts ------------------------------------------------------------
def test_packaged_calibration_prompts_are_diverse_and_not_mt_bench():
    prompts = load_prompts(calibration_prompts_path())
    assert len(prompts) >= 8
    assert len({p.category for p in prompts}) == len(prompts)  # one per category
    assert {"coding", "math", "writing"} <= {p.category for p in prompts}
    mt_bench = {p.text for p in load_prompts(mt_bench_path())}
    assert not mt_bench & {p.text for p in prompts}


# ---- errors ---------------------------------------------------------------------------
def test_missing_folder_is_a_clear_error(tmp_path, tiny):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        tune_export(tmp_path / "nowhere", options(tiny[2]))
    result = invoke("tune", tmp_path / "nowhere")
    assert result.exit_code == 1 and "does not exist" in result.output
    assert invoke("tune", tmp_path / "nowhere", "--reset").exit_code == 1


def test_empty_or_unfitting_prompt_files_are_refused(tiny, export_copy, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    result = invoke("tune", export_copy, "--prompts", empty, "--no-progress")
    assert result.exit_code == 1 and "holds no prompts" in result.output
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "word " * 40}) + "\n")
    with pytest.raises(ContextLengthError, match="Calibration prompt"):
        tune_export(export_copy, options(long, max_new_tokens=100))
    assert manifest_data(export_copy)["tuned"] is None  # nothing written on failure


@pytest.mark.parametrize("args,message", [
    (["--draft-tokens", "0,2"], "draft tokens [0, 2]"),
    (["--draft-tokens", "4,17"], "draft tokens [4, 17]: the engine verifies at most 17 rows"),
    (["--transitions", "-1"], "transitions [-1]"),
    (["--thresholds", "none,1.5"], "thresholds [None, 1.5]"),
    (["--draft-tokens", "1,2", "--transitions", "3"], "grid is empty"),
    (["--max-new-tokens", "0"], "max_new_tokens=0"),
    (["--keep", "0"], "keep_fraction=0"),
    (["--screen-prompts", "0"], "screen_prompts=0"),
])
def test_invalid_grid_and_options_are_refused(tiny, args, message):
    result = invoke("tune", tiny[1], "--prompts", tiny[2], *args)
    assert result.exit_code == 1 and message in result.output, result.output
    assert manifest_data(tiny[1])["tuned"] is None


def test_unparsable_grid_lists_are_usage_errors(tiny):
    for args in (["--draft-tokens", "1,x"], ["--thresholds", "0.3,high"], ["--threads", "0"]):
        result = invoke("tune", tiny[1], *args)
        assert result.exit_code == 2, result.output


def test_tuning_never_imports_torch(tiny, export_copy):
    code = ("import sys; from spaf_edge.runtime.tuning import tune_export, TuneOptions, Grid;"
            "tune_export(sys.argv[1], TuneOptions(prompts=sys.argv[2], limit=1, max_new_tokens=4, progress=False,"
            " grid=Grid(num_draft_tokens=(2,), transitions=(1,), thresholds=(None,))));"
            "print('LOADED', [m for m in ('torch', 'transformers') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code, str(export_copy), str(tiny[2])], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "LOADED []" in done.stdout
    assert manifest_data(export_copy)["tuned"]["num_draft_tokens"] in (2, 5)


def test_run_notes_when_the_tuning_was_measured_on_another_setup(capsys):
    from spaf_edge.cli.run import warn_if_tuned_elsewhere

    warn_if_tuned_elsewhere({"provider": "cpu", "threads": None, "thread_pool": "global"}, "cpu", None, "global")
    warn_if_tuned_elsewhere(None, "cuda", 4, "global")
    warn_if_tuned_elsewhere({"provider": "cpu", "threads": 2}, "cpu", 2, "session")  # older entries lack the pool
    assert capsys.readouterr().err == ""
    warn_if_tuned_elsewhere({"provider": "cpu", "threads": 2, "thread_pool": "global"}, "cuda", 2, "session")
    err = capsys.readouterr().err
    assert "provider 'cpu' (now 'cuda')" in err and "thread_pool 'global' (now 'session')" in err
    assert "threads 2" not in err  # only what differs is named


def test_run_notes_when_the_tuning_was_measured_on_another_cpu(capsys):
    from spaf_edge.cli.run import warn_if_tuned_elsewhere
    from spaf_edge.runtime.tuning import describe_device

    here = {"provider": "cpu", "threads": 2, "thread_pool": "global", "device": describe_device("cpu")}
    warn_if_tuned_elsewhere(here, "cpu", 2, "global")
    assert capsys.readouterr().err == ""
    zen4 = "AMD EPYC (family 25 model 17; AVX2, FMA, AVX-512F; 2 logical cores)"
    warn_if_tuned_elsewhere({**here, "device": zen4}, "cpu", 2, "global", device="AMD EPYC (family 23 model 1; AVX2)")
    err = capsys.readouterr().err
    assert "family 25 model 17" in err and "(now 'AMD EPYC (family 23 model 1; AVX2)')" in err and "re-run" in err


def test_cpu_is_named_with_its_family_model_and_vector_extensions():
    from spaf_edge.bench.report import _cpu_line
    from spaf_edge.core.machine import cpu_features, cpu_id

    zen4 = {"vendor_id": "AuthenticAMD", "cpu family": "25", "model": "17", "model name": "AMD EPYC",
            "flags": "fpu sse2 avx2 fma avx512f avx512bw avx512_vnni avx512_bf16"}
    assert cpu_id(zen4) == "family 25 model 17"
    assert cpu_features(zen4) == ["AVX2", "FMA", "AVX-512F", "AVX-512BW", "AVX-512 VNNI", "AVX-512 BF16"]
    arm = {"cpu implementer": "0x41", "cpu part": "0xd0c", "features": "fp asimd asimddp i8mm"}
    assert cpu_id(arm) == "implementer 0x41 part 0xd0c" and cpu_features(arm) == ["NEON", "NEON dotprod", "I8MM"]
    assert cpu_id({}) is None and cpu_features({}) == []
    line = _cpu_line({"cpu": "AMD EPYC", "cpu_id": "family 23 model 1", "cpu_features": ["AVX2", "FMA"]})
    assert line == "AMD EPYC (family 23 model 1; AVX2, FMA)"
    assert _cpu_line({"cpu": "AMD EPYC"}) == "AMD EPYC"  # results written before the id was recorded


def test_cpuinfo_is_read_from_the_first_processor_and_the_lines_after_every_block():
    from spaf_edge.core.machine import cpu_features, cpu_id, cpu_model, parse_cpuinfo

    x86 = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 23\nmodel\t\t: 1\n"
           "model name\t: AMD EPYC\nflags\t\t: fpu avx2 fma\n\n"
           "processor\t: 1\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: other\nflags\t\t: avx512f\n\n")
    fields = parse_cpuinfo(x86)
    assert (cpu_model(fields), cpu_id(fields), cpu_features(fields)) == ("AMD EPYC", "family 23 model 1", ["AVX2", "FMA"])
    arm = ("processor\t: 0\nFeatures\t: fp asimd asimddp\nCPU implementer\t: 0x41\nCPU part\t: 0xd08\n\n"
           "processor\t: 1\nFeatures\t: fp asimd asimddp\n\nHardware\t: BCM2711\nRevision\t: c03111\n")
    fields = parse_cpuinfo(arm)
    assert (cpu_model(fields), cpu_id(fields), cpu_features(fields)) == ("BCM2711", "implementer 0x41 part 0xd08",
                                                                         ["NEON", "NEON dotprod"])
