"""``spaf-edge demo``: the whole pipeline on the embedded default model, in one command."""

from __future__ import annotations

import click

from spaf_edge.cli import options


@click.command("demo")
@click.option("--prompt", default=None, help="Prompt text (a built-in sample when omitted).")
@options.max_new_tokens
@options.base_model
@options.components
@options.threads
def command(prompt, max_new_tokens, base_model, components, threads):
    """Prepare the default model and trained components, export, answer a prompt, report the speedup.

    Every preparation step is cached, so a second run only generates. The answer is
    generated twice by the same ONNX Runtime engine, by SpAF decoding and by plain
    greedy decoding; the tokens must be identical (SpAF is lossless) and the speedup
    is the ratio of the two speeds.
    """
    from spaf_edge.bench.demo import DEMO_PROMPT, run_demo

    result = run_demo(prompt or DEMO_PROMPT, max_new_tokens, base_model, components, threads,
                      say=lambda line: click.echo(line, err=True))
    click.echo(f"\n[spaf-edge demo] {result.summary()}", err=True)
    if not result.identical:
        raise click.ClickException("SpAF tokens differ from plain greedy decoding: please report this bug.")
