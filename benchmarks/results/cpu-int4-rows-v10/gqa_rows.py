"""One GroupQueryAttention node (SmolLM2's shapes: 9 query heads, 3 KV heads, head size 64, rotary inside,
a 2048-row shared KV buffer) alone in a session, µs per call on ONNX Runtime's global pool of 2 threads:
S = 1 or 2 query rows, with or without the padding row (a Gather before, a Slice after, the lengths + 1)
and with or without the tree inputs (position_ids, attention_bias), at two contexts T.

Usage: python gqa_rows.py
"""
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto as TP
from onnx import helper

ort.set_global_thread_pool_sizes(2, 1)
MAX, NH, KVH, D = 2048, 9, 3, 64
def gqa_model(pad, bias):
    nodes, inits = [], []
    q = "qkv"
    inputs = [helper.make_tensor_value_info("qkv", TP.FLOAT, [1, "S", (NH + 2 * KVH) * D]),
              helper.make_tensor_value_info("pk", TP.FLOAT, [1, KVH, MAX, D]), helper.make_tensor_value_info("pv", TP.FLOAT, [1, KVH, MAX, D]),
              helper.make_tensor_value_info("seqlens_k", TP.INT32, [1]), helper.make_tensor_value_info("total", TP.INT32, [])]
    inits += [helper.make_tensor("cos", TP.FLOAT, [MAX, D // 2], np.cos(np.arange(MAX * D // 2) / 100).astype(np.float32).ravel().tolist()),
              helper.make_tensor("sin", TP.FLOAT, [MAX, D // 2], np.sin(np.arange(MAX * D // 2) / 100).astype(np.float32).ravel().tolist())]
    sl, tot = "seqlens_k", "total"
    if pad:
        inputs.append(helper.make_tensor_value_info("idx", TP.INT64, ["P"])); inits += [helper.make_tensor("one", TP.INT32, [1], [1]), helper.make_tensor("sone", TP.INT32, [], [1]),
                  helper.make_tensor("st", TP.INT64, [1], [0]), helper.make_tensor("en", TP.INT64, [1], [-1]), helper.make_tensor("ax", TP.INT64, [1], [1])]
        nodes += [helper.make_node("Gather", ["qkv", "idx"], ["qkv2"], axis=1), helper.make_node("Add", ["seqlens_k", "one"], ["sl2"]),
                  helper.make_node("Add", ["total", "sone"], ["tot2"])]
        q, sl, tot = "qkv2", "sl2", "tot2"
    extra = []
    if bias:
        inputs += [helper.make_tensor_value_info("pos", TP.INT64, [1, "S2"]), helper.make_tensor_value_info("bias", TP.FLOAT, [1, 1, "S2", "T"])]
        extra = ["pos", "bias"]
    nodes.append(helper.make_node("GroupQueryAttention", [q, "", "", "pk", "pv", sl, tot, "cos", "sin", *extra], ["out", "ok", "ov"], domain="com.microsoft",
                                  num_heads=NH, kv_num_heads=KVH, scale=0.125, do_rotary=1, rotary_interleaved=0))
    out = "out"
    if pad:
        nodes.append(helper.make_node("Slice", ["out", "st", "en", "ax"], ["out2"])); out = "out2"
    g = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info(out, TP.FLOAT, None), helper.make_tensor_value_info("ok", TP.FLOAT, None), helper.make_tensor_value_info("ov", TP.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    o = ort.SessionOptions(); o.use_per_session_threads = False; o.log_severity_level = 3
    return ort.InferenceSession(m.SerializeToString(), o, providers=["CPUExecutionProvider"])
def run(sess, S, T, pad, bias, rep):
    b = sess.io_binding()
    pk = ort.OrtValue.ortvalue_from_numpy(np.random.rand(1, KVH, MAX, D).astype(np.float32)); pv = ort.OrtValue.ortvalue_from_numpy(np.random.rand(1, KVH, MAX, D).astype(np.float32))
    qkv = np.random.rand(1, S, (NH + 2 * KVH) * D).astype(np.float32)
    b.bind_cpu_input("qkv", qkv); b.bind_ortvalue_input("pk", pk); b.bind_ortvalue_input("pv", pv)
    b.bind_ortvalue_output("ok", pk); b.bind_ortvalue_output("ov", pv)
    if pad: b.bind_cpu_input("idx", np.array(list(range(S)) + [S - 1], np.int64))
    b.bind_cpu_input("seqlens_k", np.array([T - 1], np.int32)); b.bind_cpu_input("total", np.array(T, np.int32))
    if bias:
        rows = S + pad
        b.bind_cpu_input("pos", np.arange(T - S, T - S + rows, dtype=np.int64)[None]); b.bind_cpu_input("bias", np.zeros((1, 1, rows, T + pad), np.float32))
    b.bind_output("out" if not pad else "out2")
    for _ in range(50): sess.run_with_iobinding(b)
    t = time.perf_counter()
    for _ in range(rep): sess.run_with_iobinding(b)
    return (time.perf_counter() - t) / rep * 1e6
for T in (150, 400):
    for S in (1, 2):
        for pad in (0, 1):
            for bias in (0, 1):
                s = gqa_model(pad, bias)
                v = sorted(run(s, S, T, pad, bias, 300) for _ in range(5))[2]
                print(f"T={T} S={S} pad={pad} bias={bias}: {v:.1f} µs")
