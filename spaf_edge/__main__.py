"""``python -m spaf_edge`` = the ``spaf-edge`` CLI (for ``torchrun -m`` / ``accelerate launch -m``)."""

from spaf_edge.cli import main

main(prog_name="spaf-edge")
