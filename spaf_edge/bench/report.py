"""Benchmark reports: ``results.json`` (everything), ``results.md`` (tables), ``plot.png``.

The plot needs matplotlib (``pip install spaf-edge[plot]``); without it the other two
files are still written and the result notes the missing plot.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from spaf_edge.core.atomic import atomic_write_bytes, atomic_write_text
from spaf_edge.core.machine import cpu_line

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
PLOT_PNG = "plot.png"


def write_report(result: dict[str, Any], out_dir: str | Path, plot: bool = True) -> Path:
    """Write the report files (each atomically) and return the folder."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if plot:
        image = render_plot(result)
        if image is None:
            note = "plot.png not written: matplotlib is not installed (spaf-edge[plot])."
            result.setdefault("notes", []).append(note)
        else:
            atomic_write_bytes(out_dir / PLOT_PNG, image)
    atomic_write_text(out_dir / RESULTS_JSON, json.dumps(result, indent=2) + "\n")
    atomic_write_text(out_dir / RESULTS_MD, render_markdown(result))
    return out_dir


# ---- markdown -------------------------------------------------------------------
def render_markdown(result: dict[str, Any]) -> str:
    settings, machine = result["settings"], result["machine"]
    lines = [f"# SpAF edge benchmark: {result['name']}", ""]
    lines += [f"Created {result['created']} with `{result['command']}`.", ""]
    lines += ["## Setup", ""]
    lines += _table(["setting", "value"], [
        ["base model", result["models"].get("base_model")],
        ["SpAF export", result["models"].get("export_dir")],
        ["prompts", f"{len(result['prompts'])} from {settings['prompts']} ({', '.join(settings['categories'])})"],
        ["max new tokens", settings["max_new_tokens"]],
        ["precision", settings["precision"]],
        ["weight quantization", settings.get("quantization", "none")],
        ["sampling row", f"temperature {settings['sample_temperature']}, top-p {settings['sample_top_p']}"],
    ])
    described = [(name, r["settings"]) for name, r in result["runners"].items() if r.get("settings")]
    if described:
        lines += ["Decoding settings of the engine rows (the export's defaults unless the row says otherwise):", ""]
        lines += [f"- `{name}`: {text}" for name, text in described] + [""]
    lines += ["## Machine", ""]
    packages = ", ".join(f"{k} {v}" for k, v in machine.get("packages", {}).items())
    lines += _table(["", ""], [
        ["CPU", _cpu_line(machine)],
        ["cores", f"{machine.get('physical_cores')} physical / {machine.get('logical_cores')} logical"],
        ["RAM", f"{machine.get('ram_gb')} GiB"],
        ["OS", machine.get("os")],
        ["provider / threads", f"{machine.get('provider')} / {machine.get('threads') or 'default'}"],
        ["load average (start → end)", f"{machine.get('load_average')} → {machine.get('load_average_end')}"],
        ["packages", packages],
    ])
    lines += _throughput_section(result)
    lines += _speedup_section(result)
    lines += _acceptance_section(result)
    lines += _speculation_section(result)
    lines += _equality_section(result)
    skipped = {n: r for n, r in result["runners"].items() if r["status"] != "measured"}
    if skipped:
        lines += ["## Not measured", ""]
        lines += [f"- **{name}** ({r['status']}): {r['note']}" for name, r in skipped.items()] + [""]
    if result.get("notes"):
        lines += ["## Notes", ""] + [f"- {note}" for note in result["notes"]] + [""]
    return "\n".join(lines)


def _throughput_section(result: dict[str, Any]) -> list[str]:
    equality = result.get("equality") or {}
    rows = []
    for name, r in result["runners"].items():
        if r["status"] != "measured":
            continue
        memory = r.get("memory") or {}
        rows.append([
            f"`{name}`", r["label"], f"{r['tokens_per_second']:.1f}", f"{r['decode_tokens_per_second']:.1f}",
            f"{r['first_token_ms_median']:.0f}",
            f"{r['tau']:.2f}", _memory_cell(memory), _equality_cell(name, r, equality),
        ])
    header = [
        "runner", "what", "tok/s", "decode tok/s", "TTFT median (ms)", "tau", "peak RSS MiB (Δ load)",
        "tokens = its reference",
    ]
    note = (
        "tok/s: all new tokens / all wall time of the runner's timed runs (prefill included); decode tok/s: "
        "tokens after the first / time after the first token. "
        "Peak RSS: a fresh process that loads only that runner and generates once; Δ: peak minus the "
        "process's RSS before loading."
    )
    return ["## Throughput", "", *_table(header, rows), note, ""]


def _speedup_section(result: dict[str, Any]) -> list[str]:
    pairs = result.get("pairs") or []
    if not pairs:
        return ["## Speedup", "", "No SpAF/baseline pairs were measured.", ""]
    categories = result["settings"]["categories"]
    rows = [
        [f"`{p['runner']}`", f"`{p['baseline']}`", p["prompts"], f"**{p['speedup']:.2f}×**",
         f"{p['speedup_min']:.2f}–{p['speedup_max']:.2f}",
         *[f"{p['by_category'][c]:.2f}" if c in p["by_category"] else "" for c in categories]]
        for p in pairs
    ]
    header = ["runner", "baseline", "prompts", "speedup", "range", *categories]
    note = (
        "Speedup: geometric mean over prompts of runner tok/s ÷ baseline tok/s, each pair timed back to back "
        "(order alternating). `engine-greedy` vs `genai` (and `llamacpp`) is the runtime-parity check: the "
        "engine's plain decoding against the runtimes a user would pick instead; `genai-ngram` vs `genai` and "
        "`llamacpp-lookup` vs `llamacpp` are those runtimes' own prompt-lookup speculation against their plain greedy."
    )
    return ["## Speedup", "", *_table(header, rows), note, ""]


def _acceptance_section(result: dict[str, Any]) -> list[str]:
    rows = [
        [f"`{name}`", f"{r['tau']:.2f}", f"{r['acceptance_rate']:.2f}",
         " ".join(f"{a:.2f}" for a in r["acceptance_by_position"])]
        for name, r in result["runners"].items()
        if r["status"] == "measured" and r["role"] == "spaf"
    ]
    if not rows:
        return []
    header = ["SpAF row", "tau", "acceptance", "acceptance by draft position (1..N)"]
    return ["## Acceptance", "", *_table(header, rows)]


def _speculation_section(result: dict[str, Any]) -> list[str]:
    """Speculative baselines (genai-ngram, llamacpp-lookup): proof that they speculated."""
    rows = []
    for name, r in result["runners"].items():
        counts = r.get("speculation") if r["status"] == "measured" else None
        if not counts:
            continue
        drafted, accepted = counts.get("drafted", 0), counts.get("accepted", 0)
        rows.append([
            f"`{name}`", counts.get("forward_passes", 0), r["new_tokens"], f"{r['tau']:.2f}", drafted, accepted,
            f"{accepted / drafted:.2f}" if drafted else "—",
        ])
    if not rows:
        return []
    header = ["runner", "model passes after prefill", "new tokens", "tokens per pass", "drafts verified",
              "accepted", "acceptance"]
    note = (
        "From each runtime's own counters: onnxruntime-genai's `Generator.get_speculative_stats()` "
        "(verify, re-anchor and plain fallback passes); llama.cpp's passes counted around `Llama.eval`. "
        "Tokens per pass counts the prefill as the first pass, as tau does for the SpAF rows."
    )
    return ["## Speculation of the baselines", "", *_table(header, rows), note, ""]


def _equality_section(result: dict[str, Any]) -> list[str]:
    equality = result.get("equality")
    if not equality:
        return ["## Token equality", "", "Not checked: no greedy reference runner was measured.", ""]
    lines = [
        "## Token equality", "",
        f"Plain greedy runners against `{equality['reference']}`; each speculative runner against its own "
        "runtime's plain greedy (it must reproduce those tokens; quantized runtimes differ from each other).",
    ]
    if result["settings"].get("quantization", "none") != "none":
        lines[-1] += (
            f" With {result['settings']['quantization']} weights each runtime quantizes in its own way, so plain "
            "runners of different runtimes are not expected to match each other."
        )
    lines.append("")
    for name, check in equality["runners"].items():
        status = "identical" if not check["mismatches"] else "**DIFFERENT**"
        against = check.get("reference", equality["reference"])
        lines.append(f"- `{name}` vs `{against}`: {check['equal']}/{check['total']} runs identical ({status})")
        for m in check["mismatches"]:
            lines.append(
                f"  - prompt {m['prompt_id']}: first difference at new token {m['first_difference']} "
                f"({m['tokens']} vs {m['reference_tokens']} tokens)"
            )
    return lines + [""]


def _memory_cell(memory: dict[str, Any]) -> str:
    if "peak_rss_mb" in memory:
        return f"{memory['peak_rss_mb']:.0f} (Δ {memory['delta_mb']:.0f})"
    return "error" if "error" in memory else "—"


def _equality_cell(name: str, runner: dict[str, Any], equality: dict[str, Any]) -> str:
    if not runner["greedy"]:
        return "n/a (sampling)"
    if equality.get("reference") == name:
        return "reference"
    check = equality.get("runners", {}).get(name)
    if not check:
        return "—"
    return f"{check['equal']}/{check['total']} vs `{check.get('reference', equality['reference'])}`"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("" if cell is None else str(cell).replace("|", "\\|") for cell in row) + " |"
              for row in rows]
    return lines + [""]


# ---- plot -----------------------------------------------------------------------
def render_plot(result: dict[str, Any]) -> bytes | None:
    """PNG bytes: speedup by category (left) and acceptance by draft position (right)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [2, 1]})
    _plot_speedups(left, result)
    _plot_acceptance(right, result)
    figure.suptitle(f"SpAF edge benchmark: {result['name']}")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


def _plot_speedups(axes: Any, result: dict[str, Any]) -> None:
    pairs = result.get("pairs") or []
    categories = ["all", *result["settings"]["categories"]]
    width = 0.8 / max(len(pairs), 1)
    for k, pair in enumerate(pairs):
        values = [pair["speedup"], *[pair["by_category"].get(c, 0.0) for c in categories[1:]]]
        positions = [i + (k - (len(pairs) - 1) / 2) * width for i in range(len(categories))]
        axes.bar(positions, values, width, label=f"{pair['runner']} vs {pair['baseline']}")
    axes.axhline(1.0, color="black", linewidth=0.8)
    axes.set_xticks(range(len(categories)), categories, rotation=30, ha="right")
    axes.set_ylabel("speedup (× baseline tok/s)")
    axes.set_title("Speedup by category (geometric mean of pairs)")
    if pairs:
        axes.legend(fontsize=8)
    else:
        axes.text(0.5, 0.5, "no pairs measured", ha="center", transform=axes.transAxes)


def _plot_acceptance(axes: Any, result: dict[str, Any]) -> None:
    rows = {n: r for n, r in result["runners"].items() if r["status"] == "measured" and r["role"] == "spaf"}
    for name, runner in rows.items():
        rates = runner["acceptance_by_position"]
        axes.plot(range(1, len(rates) + 1), rates, marker="o", label=f"{name} (tau {runner['tau']:.2f})")
    width = max((len(r["acceptance_by_position"]) for r in rows.values()), default=0)
    axes.set_xticks(range(1, width + 1))
    axes.set_ylim(0, 1.05)
    axes.set_xlabel("draft position")
    axes.set_ylabel("acceptance rate")
    axes.set_title("Acceptance by draft position")
    if rows:
        axes.legend(fontsize=8)


def _cpu_line(machine: dict) -> str:
    """Model, family/model and vector extensions (results written before they were recorded: the model)."""
    return cpu_line(machine.get("cpu"), machine.get("cpu_id"), machine.get("cpu_features"))
