"""onnxruntime's MatMulNBits at batch 1 (one decoded token) beside a float32 MatMul: the
probe behind the exporter's defaults (accuracy_level 4, block 32; geb_jax/export/onnx_export.py).

    python experiments/probe_matmulnbits.py --threads 2

GEB-1.3B MLP matrices (K=2048, N=5632), quantized with the exporter's own quantizer: one graph
of eight independent matmuls of the same input, run in sequence, so that every call reads
8 different matrices from memory, not the cache (8 x 13 MB int8 > a server L3 slice), within one
session's thread pool. Prints ms per matmul (best of 5 x 20 runs / 8) and GB/s of weights read.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

K, N, COPIES = 2048, 5632, 8


def session(weights, bits, level, block, threads):
    """One graph: y_i = x @ w_i for every matrix, float32 MatMul (bits None) or MatMulNBits.
    Returns the session and the weight bytes one run reads."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from geb_jax.export.onnx_graph import quantize_nbits
    nodes, inits, outputs, nbytes = [], [], [], 0
    for i, weight in enumerate(weights):
        y = f"y{i}"
        outputs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, [1, N]))
        if bits is None:
            arrays = {f"w{i}": weight}
            nodes.append(helper.make_node("MatMul", ["x", f"w{i}"], [y]))
        else:
            packed, scales = quantize_nbits(weight, bits, block)
            arrays = {f"p{i}": packed, f"s{i}": scales}
            nodes.append(helper.make_node("MatMulNBits", ["x", *arrays], [y],
                                          domain="com.microsoft", K=K, N=N, bits=bits,
                                          block_size=block, accuracy_level=level))
        inits += [numpy_helper.from_array(a, name) for name, a in arrays.items()]
        nbytes += sum(a.nbytes for a in arrays.values())
    graph = helper.make_graph(
        nodes, "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K])],
        outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"]), nbytes


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((K, N), dtype=np.float32) * np.float32(0.02)
               for _ in range(COPIES)]
    x = rng.standard_normal((1, K), dtype=np.float32)
    print(f"| format | accuracy_level | block | ms / matmul | GB/s | x float32 |\n"
          f"|---|---|---|---|---|---|")
    base = None
    for bits, level, block in [(None, 0, 0), (8, 0, 32), (8, 4, 32), (8, 4, 128),
                               (4, 0, 32), (4, 4, 32), (4, 4, 128)]:
        made, nbytes = session(weights, bits, level, block, args.threads)
        made.run(None, {"x": x})
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(20):
                made.run(None, {"x": x})
            best = min(best, (time.perf_counter() - start) / 20 / COPIES)
        base = base or best
        name = "float32 MatMul" if bits is None else f"MatMulNBits {bits}-bit"
        print(f"| {name} | {level if bits else '-'} | {block or '-'} | {best * 1e3:.3f} | "
              f"{nbytes / COPIES / best / 1e9:.1f} | {base / best:.2f} |", flush=True)
        del made


if __name__ == "__main__":
    main()
