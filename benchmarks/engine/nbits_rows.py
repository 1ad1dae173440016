"""Row invariance and cost of one quantized MatMul node by number of rows M (issue: int4 exactness).

For each weight format (fp32 MatMul; MatMulNBits by bits, block size and accuracy level) it
builds a one-node graph, runs it on M = 1, 2, 3, ... rows whose first row is always the same,
and reports whether row 0's bits equal the M = 1 result and the M = 2 result, and the time
per call (best of N, wall, µs). The rows of a verify pass must get the same bits as a one-row
decode step, or speculative greedy output drifts from plain greedy at near-ties.

usage: python benchmarks/engine/nbits_rows.py [--k 576] [--n 1536] [--threads 2] [--blocks 32,128] [--levels 0,1,4]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROWS = (1, 2, 3, 4, 5, 6, 8, 16, 33)


def one_matmul(k: int, n: int, weight: np.ndarray) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "M", k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "M", n])
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="/model/layers.0/mlp/MatMul")
    graph = helper.make_graph([node], "g", [x], [y], [numpy_helper.from_array(weight, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def quantized(model: onnx.ModelProto, bits: int, block: int, level: int) -> onnx.ModelProto:
    from spaf_edge.exporters.quantize import _import_quantizer

    quantizer = _import_quantizer()(onnx.ModelProto.FromString(model.SerializeToString()), bits=bits,
                                     block_size=block, is_symmetric=True, accuracy_level=level)
    quantizer.process()
    return quantizer.model.model


def session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def probe(sess: ort.InferenceSession, k: int, reps: int, rng: np.random.Generator) -> tuple[list[str], list[float]]:
    """Every row of an M-row call vs that row alone (``=``), or else vs that row leading a two-row
    call (``≠1``), or neither (``≠``); and µs per call, for each M."""
    rows = rng.standard_normal((1, max(ROWS), k)).astype(np.float32)
    single = np.concatenate([sess.run(None, {"x": rows[:, i:i + 1]})[0] for i in range(max(ROWS))], axis=1)
    pair = np.concatenate([sess.run(None, {"x": rows[:, [i, (i + 1) % max(ROWS)]]})[0][:, :1]
                           for i in range(max(ROWS))], axis=1)
    marks, costs = [], []
    for m in ROWS:
        x = rows[:, :m].copy()
        out = sess.run(None, {"x": x})[0]
        marks.append("=" if np.array_equal(out, single[:, :m]) else ("≠1" if np.array_equal(out, pair[:, :m]) else "≠"))
        best = 1e9
        for _ in range(reps):
            start = time.perf_counter()
            sess.run(None, {"x": x})
            best = min(best, time.perf_counter() - start)
        costs.append(best * 1e6)
    return marks, costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=576)
    parser.add_argument("--n", type=int, default=1536)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--blocks", default="32,128", help="comma-separated block sizes")
    parser.add_argument("--levels", default="0,1,4", help="comma-separated accuracy levels")
    args = parser.parse_args()
    blocks, levels = ([int(v) for v in text.split(",")] for text in (args.blocks, args.levels))
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((args.k, args.n)) * 0.05).astype(np.float32)
    base = one_matmul(args.k, args.n, weight)
    cases = [("fp32 MatMul", base)]
    for bits in (4, 8):
        for block in blocks:
            for level in levels:
                cases.append((f"int{bits} b{block} level {level}", quantized(base, bits, block, level)))
    print(f"K {args.k}, N {args.n}, {args.threads} threads, onnxruntime {ort.__version__}")
    print("each row vs itself alone: '=' same bits, '≠1' differs but equals it leading a 2-row call, '≠' neither")
    header = " | ".join(f"M={m}" for m in ROWS)
    print(f"| weights | {header} |")
    for name, model in cases:
        marks, costs = probe(session(model, args.threads), args.k, args.reps, rng)
        cells = " | ".join(f"{c:.0f} {mark}" for c, mark in zip(costs, marks))
        print(f"| {name} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
