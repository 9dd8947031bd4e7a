"""Weight-only quantization for the numpy engine: int8 per output channel, int4 in groups of 32.

Formats (a matrix is used as ``y = x @ W`` with W of shape (in, out), our layout):

* **int8**, symmetric, one float32 scale per output column:
  ``scale[o] = max_i |W[i, o]| / 127``, ``code = round(W / scale)`` in [-127, 127] (int8),
  ``W ~ code * scale``. Element error <= scale[o] / 2. Storage: 1 byte per weight.
* **int4**, *asymmetric* (min/scale, like GGML's Q4_1), groups of 32 consecutive input rows per
  output column: ``W ~ code * scale + minimum`` with code in [0, 15]. scale and minimum are stored
  as float16 with directed rounding (minimum rounded down, scale rounded up) so every weight of
  the group lies in [minimum, minimum + 15 * scale] and the element error is <= scale / 2 exactly
  as in the float32 formula. Asymmetric rather than symmetric because with 16 levels an offset
  fitted to the group's [min, max] uses every level (a symmetric grid wastes part of its range
  on skewed groups); it costs nothing at run time (the minimum is a (rows, groups) @
  (groups, out) matmul in the decode path below). Storage: two codes per uint8 (row j of a
  column in the low nibble, row j + in/2 in the high nibble) plus two float16 per group:
  0.625 bytes per weight.
Both store codes out-major, (out, in), so a block of output columns is one contiguous slab.

How the matmul stays fast in numpy. There is no int8/int4 BLAS in numpy, so codes must become
float32 somewhere. Dequantizing a whole matrix into a float32 buffer writes and re-reads 4 bytes
per weight: slower than float32 itself. Instead the output columns are processed in blocks of
about ``BLOCK_BYTES`` of float32: cast a block of codes, run BLAS on it, scale its outputs.
* int8: per-channel scales commute with the matmul, ``x @ (code * s) = (x @ code) * s``, so the
  only per-weight work is the int8 -> float32 cast (~8 Gelem/s here).
* int4, decode (<= DECODE_ROWS rows in x): the group scales also move after the matmul,
  ``y = sum_g s_g * (x_g @ code_g) + (sum_i x_g,i) @ minimum``: nibbles are unpacked straight
  into float32, a batched matmul over groups multiplies the raw codes, then one multiply per
  (group, output) instead of per weight. Dequantizing each block fully (code * s + m, then one
  GEMV) was ~1.6x slower: numpy's broadcast multiply over 32-element runs is slow.
* int4, prefill (more rows): the block is fully dequantized and multiplied by one GEMM, since
  there the per-weight work is amortised over the rows.
* Per call: scratch buffers are taken once per matmul and viewed per block, and int4's float16
  scales / minima become float32 through `_f16_to_f32` (integer bit operations, exact), once
  per decode matmul for the whole matrix: numpy's float16 cast converts one element at a time
  and was ~19% of an int4 decode step, the per-block buffer lookups 10-14% of a quantized one
  (issue 15; docs/benchmarks.md, "numpy engine per-token overhead").
Measured on the 2-core shared AMD EPYC dev machine before those changes (OpenBLAS 1 thread,
random weights, `python -m geb_jax.infer.bench`): the "small" preset's 12 layers per decoded token took
float32 ~18 ms, int8 ~31 ms, int4 ~72 ms; one TinyLlama-1.1B layer 8 / 13 / 34 ms. BLOCK_BYTES
256 KiB / 512 KiB / 1 MiB / 2 MiB / 4 MiB gave int8 55 / 39 / 30 / 25 / 23 ms and int4 169 /
119 / 89 / 64 / 64 ms (small preset, a busier moment): per-call overhead dominates small blocks,
so blocks deliberately spill the 512 KiB L2 into L3. Tried and rejected: an np.take lookup table
for nibbles or int8 (5x slower than the cast), unpacking through uint32 masks (1.5x slower),
np.vecdot / einsum or multiply-by-x-then-GEMV-with-ones for the per-group products (1.4-3x
slower), splitting the column blocks over 2 Python threads (int8 2.7 -> 2.0 ms on a 2048 x 5632
matrix, still slower than float32's 1.5 ms, and worse whenever the other core is busy).

So in pure numpy the quantized matrices are 4x / 6.4x smaller (whole models ~2.4x / ~2.9x with
float32 embeddings, ~4x / ~6.4x with quantize_embeddings) but *not* faster than float32 while
float32 fits in memory: casting codes runs slower than one core streams float32 from DRAM.
Use them to fit a model in memory, or where memory bandwidth per core is scarce.

Embeddings are quantized only with ``quantize_embeddings=True``: as a table each token's column
is dequantized on lookup; a tied table is quantized once and serves as the lm head too.
"""
from __future__ import annotations

import dataclasses
import math
import threading

import numpy as np

GROUP_SIZE = 32
BLOCK_BYTES = 2 * 1024 * 1024  # float32 scratch per column block (see above)
DECODE_ROWS = 8  # int4: up to this many rows of x use the scale-after-matmul path
MODES = ("int8", "int4")

_local = threading.local()


def _buffer(name: str, size: int) -> np.ndarray:
    """A reusable flat float32 buffer of at least `size` elements (per thread), grown on
    demand. A matmul takes each buffer once and views slices of it per column block."""
    pool = getattr(_local, "pool", None)
    if pool is None:
        pool = _local.pool = {}
    flat = pool.get(name)
    if flat is None or flat.size < size:
        flat = pool[name] = np.empty(max(size, 1), np.float32)
    return flat


def _scratch(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """A reusable C-contiguous float32 buffer of `shape` (per thread)."""
    size = math.prod(shape)
    return _buffer(name, size)[:size].reshape(shape)


F16_BITS_MIN_SIZE = 2048  # smaller arrays: numpy's cast (one call) beats four passes
_F16_SUBNORMAL = np.float32(2.0 ** -140)  # a float32 subnormal, as _f16_to_f32 builds them
_F16_TO_F32_SCALE = np.float32(2.0 ** 112)  # 2^(127 - 15): float16 -> float32 exponent bias


def _f16_to_f32(src: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out (float32, C-contiguous) <- src (float16, any strides), exactly.

    numpy's float16 cast converts one element at a time (it was ~19% of an int4 decode step);
    this does it with four vectorised passes: the int16 bits, sign-extended to int32 and shifted
    left by 13, put the float16 exponent and mantissa where float32 keeps them (and copies of
    the sign into bits 28-31); clearing bits 28-30 leaves a float32 equal to the float16 value
    times 2^-112 (subnormals included), and one multiply by 2^112 rescales it. Where the CPU
    flushes subnormal inputs to zero (a DAZ flag some libraries set), and for small arrays,
    numpy's cast is used."""
    if out.size < F16_BITS_MIN_SIZE or _F16_SUBNORMAL * _F16_TO_F32_SCALE == 0:
        # small, or subnormals read as zero in this thread
        np.copyto(out, src)
        return out
    bits = out.view(np.int32)
    np.copyto(bits, src.view(np.int16))
    np.left_shift(bits, 13, out=bits)
    np.bitwise_and(bits, np.int32(-0x70000001), out=bits)  # ~0x70000000: clear bits 28-30
    np.multiply(out, _F16_TO_F32_SCALE, out=out)
    return out


def _block_cols(in_dim: int, out_dim: int) -> int:
    cols = BLOCK_BYTES // (4 * in_dim)
    cols = max(16, cols - cols % 16)
    return min(cols, out_dim)


def _check_x(x: np.ndarray, in_dim: int) -> np.ndarray:
    if x.ndim != 2 or x.shape[1] != in_dim:
        raise ValueError(f"matmul expects x of shape (rows, {in_dim}), got {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


def _out(out: np.ndarray | None, rows: int, cols: int) -> np.ndarray:
    if out is None:
        return np.empty((rows, cols), np.float32)
    if out.shape != (rows, cols) or out.dtype != np.float32:
        raise ValueError(f"out must be float32 of shape {(rows, cols)}, got {out.dtype} "
                         f"{out.shape}")
    return out


@dataclasses.dataclass
class Int8Matrix:
    """W (in, out) ~ codes.T * scale[None, :] (symmetric, per output channel).

    Codes are stored out-major, (out, in), so a block of output columns is one contiguous
    slab (casting strided rows was ~7x slower) and a token's column of a quantized embedding
    table is one contiguous row."""
    codes: np.ndarray  # int8 (out, in)
    scale: np.ndarray  # float32 (out,)

    @property
    def shape(self) -> tuple[int, int]:
        out_dim, in_dim = self.codes.shape
        return in_dim, out_dim

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scale.nbytes

    def matmul(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        in_dim, out_dim = self.shape
        x = _check_x(x, in_dim)
        rows = x.shape[0]
        out = _out(out, rows, out_dim)
        cols = _block_cols(in_dim, out_dim)
        flat = _buffer("w", cols * in_dim)
        for o0 in range(0, out_dim, cols):
            o1 = min(o0 + cols, out_dim)
            buf = flat[:(o1 - o0) * in_dim].reshape(o1 - o0, in_dim)
            np.copyto(buf, self.codes[o0:o1], casting="unsafe")
            block = out[:, o0:o1]
            np.matmul(x, buf.T, out=block)
            np.multiply(block, self.scale[o0:o1], out=block)
        return out

    def columns(self, index) -> np.ndarray:
        """Dequantized columns W[:, index] -> float32 (in, len(index))."""
        index = np.asarray(index)
        return (self.codes[index].astype(np.float32) * self.scale[index, None]).T

    def dequantize(self) -> np.ndarray:
        return np.ascontiguousarray((self.codes.astype(np.float32) * self.scale[:, None]).T)

    def max_error(self) -> np.ndarray:
        """The closed-form bound on |W - dequantize()|, broadcastable to (in, out)."""
        return self.scale[None, :] / 2


@dataclasses.dataclass
class Int4Matrix:
    """W (in, out) ~ code * scale + minimum per group of 32 input rows; codes packed in uint8.

    Stored out-major like Int8Matrix: packed[o, j] holds input row j of column o in its low
    nibble and row j + in/2 in its high nibble, so unpacking writes two long contiguous runs
    per column (nibbles of neighbouring rows made numpy run 16-element inner loops, ~2x
    slower)."""
    packed: np.ndarray  # uint8 (out, in/2)
    scale: np.ndarray  # float16 (out, in/32)
    minimum: np.ndarray  # float16 (out, in/32)

    @property
    def shape(self) -> tuple[int, int]:
        out_dim, half = self.packed.shape
        return 2 * half, out_dim

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scale.nbytes + self.minimum.nbytes

    def _codes(self, flat: np.ndarray, o0: int, o1: int) -> np.ndarray:
        """Float32 codes of columns [o0, o1) as (cols, groups, 32), in `flat`."""
        packed = self.packed[o0:o1]
        half = packed.shape[1]
        buf = flat[:(o1 - o0) * 2 * half].reshape(o1 - o0, 2, half)
        np.bitwise_and(packed, 15, out=buf[:, 0], casting="unsafe")
        np.right_shift(packed, 4, out=buf[:, 1], casting="unsafe")
        return buf.reshape(o1 - o0, 2 * half // GROUP_SIZE, GROUP_SIZE)

    def matmul(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        in_dim, out_dim = self.shape
        x = _check_x(x, in_dim)
        rows = x.shape[0]
        out = _out(out, rows, out_dim)
        if rows <= DECODE_ROWS:
            return self._matmul_decode(x, out)
        groups = in_dim // GROUP_SIZE
        cols = _block_cols(in_dim, out_dim)
        flat = _buffer("w", cols * in_dim)
        for o0 in range(0, out_dim, cols):  # dequantize the block, one GEMM
            o1 = min(o0 + cols, out_dim)
            codes = self._codes(flat, o0, o1)  # (c, G, 32)
            scale = _f16_to_f32(self.scale[o0:o1], _scratch("s", (o1 - o0, groups)))
            minimum = _f16_to_f32(self.minimum[o0:o1], _scratch("m", (o1 - o0, groups)))
            np.multiply(codes, scale[:, :, None], out=codes)
            np.add(codes, minimum[:, :, None], out=codes)
            np.matmul(x, codes.reshape(o1 - o0, in_dim).T, out=out[:, o0:o1])
        return out

    def _matmul_decode(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Few rows: y = sum_g s_g * (x_g @ code_g) + sum(x_g) * m_g, per column block."""
        in_dim, out_dim = self.shape
        rows, groups = x.shape[0], in_dim // GROUP_SIZE
        x_tgi = x.reshape(rows, groups, GROUP_SIZE)
        x_gti = x_tgi.transpose(1, 0, 2)
        x_sum = np.add.reduce(x_tgi, axis=-1)  # (rows, groups)
        # the whole matrix's scales and minima as float32 (groups, out), converted once
        scale = _f16_to_f32(self.scale.T, _scratch("s", (groups, out_dim)))
        minimum = _f16_to_f32(self.minimum.T, _scratch("m", (groups, out_dim)))
        cols = _block_cols(in_dim, out_dim)
        flat, part_flat = _buffer("w", cols * in_dim), _buffer("p", (groups + 1) * rows * cols)
        for o0 in range(0, out_dim, cols):
            o1 = min(o0 + cols, out_dim)
            codes = self._codes(flat, o0, o1)  # (c, G, 32)
            # part[g] = s_g * (x_g @ code_g) for g < G, part[G] = sum(x_g) @ m_g; y = sum
            part = part_flat[:(groups + 1) * rows * (o1 - o0)].reshape(groups + 1, rows, -1)
            np.matmul(x_gti, codes.transpose(1, 2, 0), out=part[:groups])
            np.multiply(part[:groups], scale[:, None, o0:o1], out=part[:groups])
            np.matmul(x_sum, minimum[:, o0:o1], out=part[groups])
            np.add.reduce(part, axis=0, out=out[:, o0:o1])
        return out

    def columns(self, index) -> np.ndarray:
        """Dequantized columns W[:, index] -> float32 (in, len(index))."""
        index = np.asarray(index)
        packed = self.packed[index]  # (n, in/2)
        codes = np.concatenate([packed & 15, packed >> 4], axis=1).astype(np.float32)
        codes = codes.reshape(len(index), -1, GROUP_SIZE)  # (n, G, 32)
        w = codes * self.scale[index, :, None].astype(np.float32)
        w += self.minimum[index, :, None].astype(np.float32)
        return w.reshape(len(index), -1).T

    def dequantize(self) -> np.ndarray:
        return np.ascontiguousarray(self.columns(np.arange(self.shape[1])))

    def max_error(self) -> np.ndarray:
        """|W - dequantize()| <= scale / 2 of the element's group, as an (in, out) array."""
        half = self.scale.astype(np.float32).T / 2  # (G, out)
        return np.repeat(half, GROUP_SIZE, axis=0)


def quantize_int8(w: np.ndarray) -> Int8Matrix:
    """Symmetric per-output-channel int8 of a float (in, out) matrix."""
    w = np.asarray(w, np.float32)
    if w.ndim != 2:
        raise ValueError(f"quantize_int8 expects a 2-D (in, out) matrix, got shape {w.shape}")
    scale = np.abs(w).max(axis=0) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    codes = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return Int8Matrix(np.ascontiguousarray(codes.T), scale)


def _f16_round(x: np.ndarray, direction: float) -> np.ndarray:
    """float32 -> float16 rounded toward -inf (direction < 0) or +inf (direction > 0)."""
    h = x.astype(np.float16)
    wrong = (h.astype(np.float32) > x) if direction < 0 else (h.astype(np.float32) < x)
    return np.where(wrong, np.nextafter(h, np.float16(direction * np.inf)), h)


def quantize_int4(w: np.ndarray, group_size: int = GROUP_SIZE) -> Int4Matrix:
    """Asymmetric int4 in groups of 32 input rows of a float (in, out) matrix, packed."""
    w = np.asarray(w, np.float32)
    if group_size != GROUP_SIZE:
        raise ValueError(f"int4 group_size must be {GROUP_SIZE}, got {group_size}")
    if w.ndim != 2 or w.shape[0] % GROUP_SIZE:
        raise ValueError(f"quantize_int4 expects an (in, out) matrix with in a multiple of "
                         f"{GROUP_SIZE}, got shape {w.shape}")
    if np.abs(w).max(initial=0.0) > 6e4:
        raise ValueError("quantize_int4: weights beyond +-6e4 do not fit float16 scales")
    in_dim, out_dim = w.shape
    groups = in_dim // GROUP_SIZE
    w_g = w.T.reshape(out_dim, groups, GROUP_SIZE)  # (out, G, 32)
    minimum = _f16_round(w_g.min(axis=2), -1.0)  # (out, G)
    m32 = minimum.astype(np.float32)
    needed = (w_g.max(axis=2) - m32) / 15.0
    scale = _f16_round(np.maximum(needed, np.float32(2.0 ** -24)), +1.0)  # never zero
    s32 = scale.astype(np.float32)
    codes = np.clip(np.rint((w_g - m32[:, :, None]) / s32[:, :, None]), 0, 15).astype(np.uint8)
    codes = codes.reshape(out_dim, in_dim)
    half = in_dim // 2
    packed = codes[:, :half] | (codes[:, half:] << 4)
    return Int4Matrix(np.ascontiguousarray(packed), scale.astype(np.float16),
                      minimum.astype(np.float16))


def quantize_matrix(w: np.ndarray, mode: str):
    if mode == "int8":
        return quantize_int8(w)
    if mode == "int4":
        return quantize_int4(w)
    raise ValueError(f"unknown quantization mode {mode!r}; choose one of {', '.join(MODES)}")


def quantize_weights(weights, mode: str | None, quantize_embeddings: bool = False):
    """A copy of `weights` with every layer matmul quantized (and the embedding/lm head with
    quantize_embeddings=True). mode None / "none" / "float32" returns `weights` unchanged."""
    from geb_jax.infer.weights import Weights  # pylint: disable=import-outside-toplevel

    if mode in (None, "none", "float32", "fp32"):
        return weights
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; choose one of "
                         f"{', '.join(MODES)} (or none)")
    if not isinstance(weights, Weights):
        raise TypeError(f"quantize_weights expects Weights, got {type(weights).__name__}")
    layers = [dataclasses.replace(
        layer, qkv=_q(layer.qkv, mode), o=_q(layer.o, mode), gate_up=_q(layer.gate_up, mode),
        down=_q(layer.down, mode)) for layer in weights.layers]
    embedding, lm_head = weights.embedding, weights.lm_head
    if quantize_embeddings:
        if weights.config.tie_embeddings:
            embedding = lm_head = _q(lm_head, mode)  # one (D, V) matrix: table and head
        else:
            lm_head = _q(lm_head, mode)
            embedding = _q(_table_as_matrix(embedding), mode)
    return dataclasses.replace(weights, layers=layers, embedding=embedding, lm_head=lm_head,
                               quantization=mode)


def _q(w, mode):
    return w if not isinstance(w, np.ndarray) else quantize_matrix(w, mode)


def _table_as_matrix(table):
    """An embedding table (V, D) viewed as the (D, V) matrix whose columns are token vectors."""
    return table.T if isinstance(table, np.ndarray) else table
