"""onnxruntime's MatMulNBits beside a float32 MatMul, at one decoded token (x of 1 row) and a
512-token prefill (512 rows): the probe behind the exporter's defaults (accuracy_level 4,
symmetric blocks of 32 at int8 and 128 at int4; geb_jax/export/onnx_graph.py).

    python experiments/probe_matmulnbits.py --threads 2

GEB-1.3B MLP matrices (K=2048, N=5632), quantized with the exporter's own quantizer
(symmetric; "asym" rows: onnxruntime's asymmetric blocks with uint4 zero points, the format
before): one graph of eight independent matmuls of the same input, run in sequence, so that
every call reads 8 different matrices from memory, not the cache (8 x 13 MB int8 > a server
L3 slice), within one session's thread pool. Prints ms per matmul (best of 5 runs / 8; 20
calls per run at 1 row) and GB/s of weights read at 1 row.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

K, N, COPIES = 2048, 5632, 8
FORMATS = [(None, 0, 0, True), (8, 0, 32, True), (8, 4, 32, True), (8, 4, 128, True),
           (4, 0, 32, True), (4, 4, 32, False), (4, 4, 32, True), (4, 4, 64, True),
           (4, 4, 128, False), (4, 4, 128, True)]


def quantized(weight, bits, block, symmetric):
    """{suffix: array} of one MatMulNBits weight: packed codes, scales (+ zero points)."""
    # pylint: disable=import-outside-toplevel,no-name-in-module
    from geb_jax.export.onnx_graph import quantize_nbits
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits
    if symmetric:
        packed, scales = quantize_nbits(weight, bits, block)
        return {"p": packed, "s": scales}
    blocks = K // block
    packed = np.zeros((N, blocks, block // 2), np.uint8)
    scales = np.zeros((N, blocks), np.float32)
    zero = np.zeros((N, -(-blocks // 2)), np.uint8)
    quantize_matmul_4bits(packed, weight, scales, zero, block, N, K, False)
    return {"p": packed, "s": scales, "z": zero}


def session(weights, bits, level, block, symmetric, threads):
    """One graph: y_i = x @ w_i for every matrix, float32 MatMul (bits None) or MatMulNBits.
    Returns the session and the weight bytes one run reads."""
    import onnxruntime as ort  # pylint: disable=import-outside-toplevel
    from onnx import TensorProto, helper, numpy_helper  # pylint: disable=import-outside-toplevel
    nodes, inits, outputs, nbytes = [], [], [], 0
    for i, weight in enumerate(weights):
        y = f"y{i}"
        outputs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, ["M", N]))
        if bits is None:
            arrays = {f"w{i}": weight}
            nodes.append(helper.make_node("MatMul", ["x", f"w{i}"], [y]))
        else:
            arrays = {f"{k}{i}": a for k, a in quantized(weight, bits, block, symmetric).items()}
            nodes.append(helper.make_node("MatMulNBits", ["x", *arrays], [y],
                                          domain="com.microsoft", K=K, N=N, bits=bits,
                                          block_size=block, accuracy_level=level))
        inits += [numpy_helper.from_array(a, name) for name, a in arrays.items()]
        nbytes += sum(a.nbytes for a in arrays.values())
    graph = helper.make_graph(
        nodes, "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", K])],
        outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"]), nbytes


def best_ms(made, x, calls: int) -> float:
    made.run(None, {"x": x})
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            made.run(None, {"x": x})
        best = min(best, (time.perf_counter() - start) / calls / COPIES)
    return best * 1e3


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prefill-rows", type=int, default=512, help="0: decode only")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((K, N), dtype=np.float32) * np.float32(0.02)
               for _ in range(COPIES)]
    x1 = rng.standard_normal((1, K), dtype=np.float32)
    xp = rng.standard_normal((max(args.prefill_rows, 1), K), dtype=np.float32)
    print(f"| format | accuracy_level | block | ms / matmul, 1 row | GB/s | x float32 | "
          f"ms / matmul, {args.prefill_rows} rows |\n|---|---|---|---|---|---|---|")
    base = None
    for bits, level, block, symmetric in FORMATS:
        made, nbytes = session(weights, bits, level, block, symmetric, args.threads)
        decode = best_ms(made, x1, 20)
        prefill = best_ms(made, xp, 1) if args.prefill_rows else float("nan")
        base = base or decode
        name = "float32 MatMul" if bits is None else \
            f"MatMulNBits {bits}-bit {'sym' if symmetric else 'asym'}"
        print(f"| {name} | {level if bits else '-'} | {block or '-'} | {decode:.3f} | "
              f"{nbytes / COPIES / decode / 1e6:.1f} | {base / decode:.2f} | {prefill:.2f} |",
              flush=True)
        del made


if __name__ == "__main__":
    main()
