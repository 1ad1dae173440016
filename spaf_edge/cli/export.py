"""``spaf-edge export``: a base model + SpAF components -> an ONNX export folder."""

from __future__ import annotations

import click

from spaf_edge.cli import options
from spaf_edge.core.embedding_layout import QUANTIZATION_BITS


@click.command("export")
@options.base_model
@options.components
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Export folder to write.")
@options.precision
@click.option("--quantize", type=click.Choice(["none", *QUANTIZATION_BITS]), default="none", show_default=True,
              help="Weight-only quantization of the decoder MatMuls (ONNX Runtime MatMulNBits).")
@click.option("--max-length", type=int, default=None,
              help="KV cache rows = max prompt + generated tokens (default min(model context, 2048)).")
@click.option("--exit-layer", type=int, default=None, help="Trained exit to export (default: the cutoff).")
@options.cutoff_layer
@click.option("--overwrite", is_flag=True, help="Replace an existing export folder.")
@click.option("--check/--no-check", default=False, show_default=True,
              help="Run graph parity (ONNX vs PyTorch) on the export.")
def command(base_model, components, out, precision, quantize, max_length, exit_layer, cutoff_layer, overwrite,
            check):
    """Export the lower, upper, draft-head and drafter ONNX graphs, shared weights, tokenizer and manifest."""
    from spaf_edge.exporters.export import export_pretrained
    from spaf_edge.models.loading import resolve_components

    components = resolve_components(base_model, components) if cutoff_layer is None else components
    result = export_pretrained(
        out, base_model=base_model, components=components, cutoff_layer=cutoff_layer, dtype=precision,
        quantization=quantize, max_length=max_length, exit_layer=exit_layer, overwrite=overwrite, check=check,
    )
    click.echo(result.summary())
    if result.parity is not None and not result.parity.passed:
        raise click.ClickException("graph parity failed: the export does not match the PyTorch model.")
