"""The ``spaf-edge`` command line. Each command lives in its own module and stays thin:
it parses options and calls one library function. Heavy imports (torch, transformers)
happen inside commands, so runtime-only commands start without them.
"""

from __future__ import annotations

import importlib
import logging
import os

import click

from spaf_edge.core.config import THREAD_POOL_ENV, THREAD_POOLS
from spaf_edge.core.errors import SpAFError

# Modules under spaf_edge.cli, each defining a click command named ``command``.
COMMAND_MODULES = (
    "demo", "generate", "info", "train", "distill", "bench", "run", "validate", "export", "tune", "agreement",
)


class _Group(click.Group):
    """Turns SpAFError into a one-line error message (exit code 1) instead of a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except SpAFError as exc:
            raise click.ClickException(str(exc)) from exc


@click.group(cls=_Group)
@click.option("-v", "--verbose", is_flag=True, help="Log progress details.")
@click.option(
    "--thread-pool", type=click.Choice(THREAD_POOLS), default="global", show_default=True,
    envvar=THREAD_POOL_ENV,
    help="ONNX Runtime threads of the engine's sessions: one process-wide pool (faster with several threads) "
         "or a pool per session with sleeping workers (safe next to other ONNX Runtime users). Goes before "
         "the command: spaf-edge --thread-pool session run ...",
)
@click.version_option(package_name="spaf-edge")
def main(verbose: bool, thread_pool: str) -> None:
    """SpAF edge: self-speculative decoding for LLMs on edge devices."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    # The engine reads its default from there (spaf_edge.runtime.session); set without importing onnxruntime.
    os.environ[THREAD_POOL_ENV] = thread_pool


for _name in COMMAND_MODULES:
    main.add_command(importlib.import_module(f"spaf_edge.cli.{_name}").command)
