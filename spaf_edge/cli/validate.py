"""``spaf-edge validate``: graph parity + end-to-end token equality of an export folder."""

from __future__ import annotations

import json

import click

from spaf_edge.cli import options


@click.command("validate")
@click.argument("export_dir", type=click.Path(file_okay=False))
@options.base_model
@options.components
@click.option("--prompt", "prompts", multiple=True, help="A prompt to check (repeatable; default: built-in prompts).")
@click.option("--max-new-tokens", type=options.NEW_TOKENS, default=32, show_default=True,
              help="Greedy tokens per prompt.")
@options.chat
@options.provider
@click.option("--parity/--no-parity", default=True, show_default=True, help="Run the per-graph parity check.")
@click.option("--json-output", is_flag=True, help="Also print the parity report as JSON.")
@click.pass_context
def command(ctx, export_dir, base_model, components, prompts, max_new_tokens, chat, provider, parity, json_output):
    """Check an export against PyTorch: per-graph parity, then engine == PyTorch SpAF == base greedy tokens.

    Exits 0 when everything passes, 1 otherwise.
    """
    from spaf_edge.models.loading import resolve_components
    from spaf_edge.validation.end_to_end import validate_export

    components = resolve_components(base_model, components)
    report = validate_export(
        export_dir, base_model=base_model, components=components, prompts=list(prompts) or None,
        max_new_tokens=max_new_tokens, provider=provider, parity=parity, chat=chat,
    )
    click.echo(report.summary())
    if json_output and report.parity is not None:
        click.echo(json.dumps(report.parity.to_dict()))
    ctx.exit(0 if report.passed else 1)
