"""``spaf-edge bench``: SpAF against every installed baseline, same prompts, one process."""

from __future__ import annotations

import shlex
import sys

import click

from spaf_edge.cli import options
from spaf_edge.core.embedding_layout import QUANTIZATION_BITS


def _remote(ctx, param, values):
    """``NAME=PYTHON`` pairs -> dict."""
    pairs = {}
    for value in values:
        name, sep, python = value.partition("=")
        if not sep or not name or not python:
            raise click.BadParameter(f"{value!r}: expected RUNNER=PATH/TO/python, e.g. optimum=/venv/bin/python.")
        pairs[name] = python
    return pairs


@click.command("bench")
@options.base_model
@options.components
@click.option("--export-dir", type=click.Path(file_okay=False), default=None,
              help="Benchmark this SpAF export folder (else --base-model/--components are exported to a cache).")
@options.prompts_file("the packaged MT-Bench first turns")
@options.limit
@click.option("--per-category", type=int, default=None, help="Use only the first N prompts of each category.")
@options.max_new_tokens
@options.chat
@options.provider
@options.precision
@click.option("--quantize", type=click.Choice(["none", *QUANTIZATION_BITS]), default="none", show_default=True,
              help="Weight-only quantization of the SpAF export (an --export-dir must match) and of genai's model.")
@options.threads
@click.option("--runners", default=None,
              help="Comma-separated runners to include (default: all): hf, genai, genai-ngram, optimum, llamacpp, "
                   "llamacpp-lookup, engine-greedy, engine-sample, spaf, spaf-chain, spaf-lookup, spaf-tree-near, "
                   "spaf-sample.")
@click.option("--baseline-python", "remote_python", multiple=True, callback=_remote, metavar="RUNNER=PYTHON",
              help="Run a baseline in another interpreter (its own venv), e.g. optimum=/work/venv-optimum/bin/python.")
@click.option("--name", default=None,
              help="Results folder name (default: model-precision[-quantization]-provider-time).")
@click.option("--output-dir", type=click.Path(file_okay=False), default="benchmarks/results", show_default=True)
@click.option("--memory/--no-memory", default=True, show_default=True,
              help="Measure each runner's peak RSS in a fresh process.")
@click.option("--plot/--no-plot", default=True, show_default=True)
@click.option("--seed", type=options.SEED, default=0, show_default=True,
              help="Sampling seed of the first prompt (+1 per prompt).")
def command(base_model, components, export_dir, prompts_file, limit, per_category, max_new_tokens, chat, provider,
            precision, quantize, threads, runners, remote_python, name, output_dir, memory, plot, seed):
    """Time SpAF against HF transformers, onnxruntime-genai (plain and n-gram), optimum, llama.cpp and the
    engine's plain decoding."""
    from spaf_edge.bench import BenchOptions, run_benchmark
    from spaf_edge.models.loading import resolve_components

    components = resolve_components(base_model, components) if export_dir is None else components
    bench_options = BenchOptions(
        name=name, output_root=output_dir, prompts=prompts_file, limit=limit, per_category=per_category,
        max_new_tokens=max_new_tokens, chat=chat, base_model=base_model, components=components,
        export_dir=export_dir, provider=provider, precision=precision, quantization=quantize, threads=threads,
        runners=[r.strip() for r in runners.split(",") if r.strip()] if runners else None,
        remote_python=remote_python, memory=memory, plot=plot, seed=seed,
        command=shlex.join(["spaf-edge", *sys.argv[1:]]),
    )
    result, out_dir = run_benchmark(bench_options, progress=lambda line: click.echo(f"[bench] {line}", err=True))
    for pair in result["pairs"]:
        click.echo(f"{pair['runner']} vs {pair['baseline']}: {pair['speedup']:.2f}x over {pair['prompts']} prompts")
    click.echo(f"Report: {out_dir}")
