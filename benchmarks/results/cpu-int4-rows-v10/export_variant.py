"""Export the default model at int4 without the attention padding row: a measurement variant, NOT exact
(one-row attention then rounds differently from multi-row verify calls), never for use.

Usage: python export_variant.py OUT
"""

import dataclasses
import sys

from spaf_edge.exporters.graphs import GraphPlan

shape = GraphPlan.shape.fget
GraphPlan.shape = property(lambda plan: dataclasses.replace(shape(plan), pad_row=False))

from spaf_edge.cli import main  # noqa: E402

sys.argv = ["spaf-edge", "export", "--out", sys.argv[1], "--quantize", "int4", "--overwrite"]
main()
