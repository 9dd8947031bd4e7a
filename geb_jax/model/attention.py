"""Causal attention over packed documents, one kernel per backend.

`attend(q_btnh, k_btkh, v_btkh, segment_ids_bt, impl)` is the one entry point. Every impl computes
the same thing: query t attends to key s iff s <= t and segment_ids[s] == segment_ids[t], with
the usual 1/sqrt(H) scale; N query heads share K KV heads in groups of N / K (head n reads KV head
n // (N / K), as jax.nn.dot_product_attention does). Padding (segment id 0, data/pipeline.py) is
one more segment, so pad tokens attend to each other exactly as they always did; the loss masks
them, and no row is ever fully masked (a token always sees itself).

    impl          API                                            packed documents as
    xla           jax.nn.dot_product_attention("xla")            dense (B, 1, T, T) boolean mask
    cudnn         jax._src.cudnn.fused_attention_stablehlo       per-row segment lengths + offsets
                  .dot_product_attention (cuDNN flash, BTNH)     (its packed "THD" layout)
    pallas_gpu    jax.experimental.pallas.ops.gpu.attention.mha  segment ids, in the kernel
    pallas_tpu    pallas.ops.tpu.splash_attention (splash MHA)   SegmentIds + CausalMask
    auto          resolve_attention_impl: CPU -> xla, GPU -> cudnn, else pallas_gpu, else xla;
                  TPU -> pallas_tpu when T is a multiple of 128, else xla

xla is the reference the kernels are tested against (tests/test_attention_kernels.py); only it
builds a (B, 1, T, T) tensor. When a mesh is set (jax.set_mesh) the kernel impls run under
shard_map, each device on its own batch rows and heads (the model's logical axis rules), because
a Pallas or cuDNN custom call left to the automatic partitioner would be gathered whole onto
every device.
"""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from geb_jax.errors import ConfigError
from geb_jax.model.config import ATTENTION_IMPLS

Array = jax.Array

_HALF_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_CUDNN_MIN_CAPABILITY = (9, 0)  # the packed layout needs Hopper (fused_attention_stablehlo)
_CUDNN_MIN_VERSION = 90600  # the packed layout's first cuDNN (jax's own packed-layout test)


def attention_mask(segment_ids_bt: Array) -> Array:
    """(B, 1, T, T) boolean: causal, and only within the same packed document."""
    t = segment_ids_bt.shape[1]
    causal_tt = jnp.tril(jnp.ones((t, t), dtype=bool))
    same_doc_btt = segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]
    return (causal_tt[None] & same_doc_btt)[:, None]


# ----------------------------------------------------------------------------- choosing an impl
def _block(seq_len: int, candidates: tuple[int, ...]) -> int | None:
    """The largest candidate block that divides T (kernels tile T exactly), or None."""
    return next((b for b in candidates if seq_len % b == 0), None)


_PALLAS_GPU_BLOCKS = (128, 64, 32, 16)  # Triton's dot needs tiles of at least 16
_PALLAS_GPU_BWD_BLOCKS = (32, 16)  # the kernel's default backward tiles, smaller when T needs it
_SPLASH_BLOCKS = (512, 256, 128)  # splash tiles are multiples of the 128 TPU lanes


@functools.lru_cache(maxsize=1)
def _gpu_facts() -> tuple[tuple[int, ...] | None, int | None]:
    """(compute capability, cuDNN version) of the first GPU; None for what cannot be read
    (ROCm, no cuDNN)."""
    try:
        capability = tuple(int(x) for x in jax.devices("gpu")[0].compute_capability.split("."))
    except Exception:  # noqa: BLE001 - any failure means "not a CUDA GPU we can ask"
        capability = None
    try:
        from jax._src.cudnn.fused_attention_stablehlo import check_cudnn_version
        version = int(check_cudnn_version())
    except Exception:  # noqa: BLE001
        version = None
    return capability, version


def _cudnn_problem(dtype, head_dim: int, capability, cudnn_version) -> str | None:
    """Why cuDNN flash with the packed layout cannot run here, or None."""
    if capability is None:
        return "no CUDA compute capability (not an NVIDIA GPU?)"
    if tuple(capability) < _CUDNN_MIN_CAPABILITY:
        return (f"cuDNN's packed-document layout needs sm_90+ (Hopper), this GPU is "
                f"sm_{''.join(map(str, capability))}")
    if cudnn_version is not None and cudnn_version < _CUDNN_MIN_VERSION:
        return f"cuDNN {cudnn_version} predates the packed layout (needs {_CUDNN_MIN_VERSION}+)"
    if jnp.dtype(dtype) not in _HALF_DTYPES:
        return f"cuDNN flash needs bfloat16/float16 compute, got {jnp.dtype(dtype).name}"
    if head_dim % 8 or head_dim > 256:
        return f"cuDNN flash needs head_dim a multiple of 8 and <= 256, got {head_dim}"
    return None


def _pallas_gpu_problem(seq_len: int) -> str | None:
    if _block(seq_len, _PALLAS_GPU_BLOCKS) is None:
        return f"the Pallas GPU kernel tiles T by 16..128, T={seq_len} is not a multiple of 16"
    return None


def _splash_problem(seq_len: int) -> str | None:
    if _block(seq_len, _SPLASH_BLOCKS) is None:
        return f"splash attention tiles T by multiples of 128, got T={seq_len}"
    return None


def resolve_attention_impl(requested: str, backend: str, dtype, head_dim: int, seq_len: int,
                           gpu: tuple | None = None) -> tuple[str, str]:
    """(impl, reason): what `attend` runs for this request on this backend, and why.

    `backend` is jax.default_backend() ("cpu", "gpu", "tpu"; "cuda"/"rocm" also accepted).
    `gpu` = (compute capability tuple, cuDNN version int) is read from the first GPU when None.
    "auto" falls back, with the reason, to the next kernel that can run (cudnn -> pallas_gpu ->
    xla on GPU; pallas_tpu -> xla on TPU). An explicit impl that cannot run raises ConfigError
    naming why, instead of silently running something else.
    """
    if requested not in ATTENTION_IMPLS:
        raise ConfigError(f"model.attention_impl={requested!r} is not one of "
                          f"{', '.join(ATTENTION_IMPLS)}.")
    backend = {"cuda": "gpu", "rocm": "gpu"}.get(backend, backend)
    if requested == "xla":
        return "xla", "requested"
    problems: dict[str, str | None] = {}
    if backend == "gpu":
        capability, version = _gpu_facts() if gpu is None else gpu
        problems["cudnn"] = _cudnn_problem(dtype, head_dim, capability, version)
        problems["pallas_gpu"] = _pallas_gpu_problem(seq_len)
    if backend == "tpu":
        problems["pallas_tpu"] = _splash_problem(seq_len)

    if requested != "auto":
        if requested not in problems:
            raise ConfigError(f"model.attention_impl={requested!r} does not run on the {backend} "
                              f"backend; use 'auto' or 'xla'.")
        if problems[requested]:
            raise ConfigError(f"model.attention_impl={requested!r} cannot run: "
                              f"{problems[requested]}. Use 'auto' to fall back.")
        return requested, "requested"
    if not problems:
        return "xla", f"auto on {backend}: no fused attention kernel there"
    skipped = ""
    for impl, problem in problems.items():
        if problem is None:
            return impl, f"auto on {backend}: {impl}{skipped}"
        skipped += f"; not {impl}: {problem}"
    return "xla", f"auto on {backend}: xla{skipped}"


# ----------------------------------------------------------------------------- cuDNN layout
def cudnn_max_segments(seq_len: int) -> int:
    """Documents per row the cuDNN path makes room for: T / 32, between 2 and 64.

    cuDNN keeps float32 softmax statistics of shape (B * M, N, T), so M costs memory; rows with
    more documents than M come out NaN (see `_cudnn`). Documents average well over 32 tokens in
    our data (bos + text + eos pretraining rows, chat-templated SFT conversations).
    """
    return int(min(64, max(2, seq_len // 32)))


def cudnn_packed_layout(segment_ids_bt: Array, max_segments: int
                        ) -> tuple[Array, Array, Array]:
    """Segment ids -> cuDNN's packed layout: (seqlens (B, M), offsets (B, M + 1), overflow (B,)).

    Each maximal run of equal ids is one document (padding too): offsets[b, i] is where row b's
    i-th run starts, seqlens[b, i] its length, -1 in unused slots (fused_attention_stablehlo's
    convention; it compacts them across the batch itself). A row with more than M runs merges
    its runs from the M-th on into the last slot and is flagged in `overflow`. (The pipeline
    writes each document as one run; an id recurring after another would be two documents
    here, one for the mask-based impls.)
    """
    if max_segments < 2:
        raise ValueError("cudnn_packed_layout needs max_segments >= 2: with one slot jax does "
                         "not take the packed layout.")
    b, t = segment_ids_bt.shape
    starts_bt = jnp.concatenate([jnp.ones((b, 1), bool),
                                 segment_ids_bt[:, 1:] != segment_ids_bt[:, :-1]], axis=1)
    run_bt = jnp.cumsum(starts_bt, axis=1, dtype=jnp.int32) - 1
    overflow_b = run_bt[:, -1] >= max_segments
    slot_bt = jnp.minimum(run_bt, max_segments - 1)
    lengths_bm = jnp.zeros((b, max_segments), jnp.int32).at[
        jnp.arange(b)[:, None], slot_bt].add(1)
    used_bm = lengths_bm > 0  # the used slots are a prefix: every row has a first run
    offsets_bm = jnp.cumsum(lengths_bm, axis=1) - lengths_bm
    seqlens_bm = jnp.where(used_bm, lengths_bm, -1)
    offsets_bm1 = jnp.concatenate([jnp.where(used_bm, offsets_bm, -1),
                                   jnp.full((b, 1), -1, jnp.int32)], axis=1)
    return seqlens_bm, offsets_bm1, overflow_b


# ----------------------------------------------------------------------------- the kernels
def _repeat_kv(x_btkh: Array, n_heads: int) -> Array:
    """KV heads repeated to N (head n reads KV head n // (N / K)), for kernels without GQA."""
    return jnp.repeat(x_btkh, n_heads // x_btkh.shape[2], axis=2)


def _xla(q_btnh, k_btkh, v_btkh, segment_ids_bt):
    return jax.nn.dot_product_attention(q_btnh, k_btkh, v_btkh,
                                        mask=attention_mask(segment_ids_bt), implementation="xla")


def _cudnn(q_btnh, k_btkh, v_btkh, segment_ids_bt, max_segments: int | None):
    """cuDNN flash, causal within each packed document.

    The public jax.nn.dot_product_attention takes only one length per row, so packing goes
    through the internal fused_attention_stablehlo API (q/kv offsets + per-document lengths,
    PADDING_CAUSAL: causal inside each document). KV heads are repeated to N: jax <= 0.10.x
    scales kv_offsets by the *query* heads (jax-ml/jax#39521), which points GQA keys at the
    wrong tokens; with K = N both strides agree. Rows with more documents than max_segments
    come out NaN, so the loss and the spike guard (train/spikes.py counts a non-finite loss as a
    spike) see it instead of cross-document attention being trained silently.
    """
    from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention

    t, n, h = q_btnh.shape[1:]
    max_segments = cudnn_max_segments(t) if max_segments is None else max_segments
    seqlens_bm, offsets_bm1, overflow_b = cudnn_packed_layout(segment_ids_bt, max_segments)
    out_btnh = dot_product_attention(
        q_btnh, _repeat_kv(k_btkh, n), _repeat_kv(v_btkh, n),
        q_seqlen=seqlens_bm, kv_seqlen=seqlens_bm, q_offsets=offsets_bm1,
        kv_offsets=offsets_bm1, scale=1.0 / math.sqrt(h), mask_type=MaskType.PADDING_CAUSAL,
        qkv_layout="BTNH")
    return jnp.where(overflow_b[:, None, None, None], jnp.nan, out_btnh).astype(q_btnh.dtype)


def _pallas_gpu(q_btnh, k_btkh, v_btkh, segment_ids_bt, interpret: bool):
    """The Pallas (Triton) flash kernel: BTNH, segment ids in the kernel, no GQA (KV repeated)."""
    from jax.experimental.pallas.ops.gpu import attention as gpu_attention

    t, n, h = q_btnh.shape[1:]
    problem = _pallas_gpu_problem(t)
    if problem:
        raise ConfigError(problem)
    fwd, bwd = _block(t, _PALLAS_GPU_BLOCKS), _block(t, _PALLAS_GPU_BWD_BLOCKS) or t
    sizes = gpu_attention.BlockSizes(block_q=fwd, block_k=fwd, block_q_dkv=bwd, block_kv_dkv=bwd,
                                     block_q_dq=bwd, block_kv_dq=bwd)
    return gpu_attention.mha(q_btnh, _repeat_kv(k_btkh, n), _repeat_kv(v_btkh, n),
                             segment_ids_bt, sm_scale=1.0 / math.sqrt(h), causal=True,
                             block_sizes=sizes, interpret=interpret)


def _pallas_tpu(q_btnh, k_btkh, v_btkh, segment_ids_bt, interpret: bool):
    """Splash attention: per row (vmapped), (N, T, H) queries against (K, T, H) keys - splash's
    MHA kernel shares KV head n // (N / K) itself. It has no scale argument, so 1/sqrt(H) is
    folded into q (rounded once more in bfloat16 than the xla path)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as splash, splash_attention_mask as splash_mask)

    t, n, h = q_btnh.shape[1:]
    problem = _splash_problem(t)
    if problem:
        raise ConfigError(problem)
    block = _block(t, _SPLASH_BLOCKS)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                              block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                              block_q_dq=block, block_kv_dq=block)
    mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((t, t))] * n)
    kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                    interpret=interpret)

    def one_row(q_nth, k_kth, v_kth, segment_ids_t):
        return kernel(q_nth, k_kth, v_kth,
                      segment_ids=splash.SegmentIds(q=segment_ids_t, kv=segment_ids_t))

    scale = jnp.asarray(1.0 / math.sqrt(h), q_btnh.dtype)
    to_bnth = lambda x: jnp.transpose(x, (0, 2, 1, 3))
    out_bnth = jax.vmap(one_row)(to_bnth(q_btnh * scale), to_bnth(k_btkh), to_bnth(v_btkh),
                                 segment_ids_bt)
    return to_bnth(out_bnth)


# ----------------------------------------------------------------------------- sharding
def _divides(mesh, axes, dim: int) -> bool:
    """Whether mesh axes `axes` (a name, a tuple of names, or None) split `dim` evenly."""
    names = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
    if any(name not in mesh.axis_names for name in names):
        return False
    return dim % math.prod(mesh.shape[name] for name in names) == 0


def _per_device(kernel, q_btnh, k_btkh, v_btkh, segment_ids_bt):
    """Runs `kernel` under shard_map over the set mesh (batch and heads as the logical axis
    rules say; a dimension its mesh axes do not divide stays whole), or as is without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return kernel(q_btnh, k_btkh, v_btkh, segment_ids_bt)
    P = jax.sharding.PartitionSpec
    batch, heads = nn.logical_to_mesh_axes(("batch", "heads"))
    kv_heads, = nn.logical_to_mesh_axes(("kv_heads",))
    b, _, n, _ = q_btnh.shape
    if not _divides(mesh, batch, b):
        batch = None
    # A shard keeps whole GQA groups only if queries and keys split the same way.
    k = k_btkh.shape[2]
    if heads != kv_heads or not (_divides(mesh, heads, n) and _divides(mesh, heads, k)):
        heads = None
    qkv, ids = P(batch, None, heads, None), P(batch, None)
    return jax.shard_map(kernel, mesh=mesh, in_specs=(qkv, qkv, qkv, ids), out_specs=qkv,
                         check_vma=False)(q_btnh, k_btkh, v_btkh, segment_ids_bt)


def attend(q_btnh: Array, k_btkh: Array, v_btkh: Array, segment_ids_bt: Array,
           impl: str = "auto", *, interpret: bool = False,
           max_segments: int | None = None) -> Array:
    """Causal attention within packed documents -> (B, T, N, H) in q's dtype.

    `impl` is one of ATTENTION_IMPLS, resolved for jax.default_backend() (an impl that cannot run
    there is a ConfigError). interpret=True runs a Pallas impl in Pallas' interpreter on any
    backend (tests). max_segments: documents per row on the cudnn path (cudnn_max_segments).
    """
    t, _, h = q_btnh.shape[1:]
    if interpret:
        if impl not in ("pallas_gpu", "pallas_tpu"):
            raise ValueError(f"interpret=True runs a Pallas impl, not {impl!r}.")
    else:
        impl, _ = resolve_attention_impl(impl, jax.default_backend(), q_btnh.dtype, h, t)
    if impl == "xla":
        return _xla(q_btnh, k_btkh, v_btkh, segment_ids_bt)
    kernel = {
        "cudnn": functools.partial(_cudnn, max_segments=max_segments),
        "pallas_gpu": functools.partial(_pallas_gpu, interpret=interpret),
        "pallas_tpu": functools.partial(_pallas_tpu, interpret=interpret),
    }[impl]
    return _per_device(kernel, q_btnh, k_btkh, v_btkh, segment_ids_bt)
