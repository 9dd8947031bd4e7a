"""LoRA (Hu et al. 2021) on the same pure `apply`: adapters are a separate pytree, merged in.

    adapters = init_adapters(params, lora, rng)        # {"layers": {"attn": {"q": {"a", "b"}}}}
    logits = make_apply(config)(merge(params, adapters, lora), tokens, positions, segments)

For each target matrix W of the parameter tree (stacked on the leading `layers` axis, shapes in
the alphabet of model/config.py) the adapter is a pair

    a: (L, *in, r)   b: (L, r, *out)      W' = W + (alpha / r) * a @ b   (contracting r)

    q: W (L, D, N, H)  a (L, D, r)     b (L, r, N, H)
    k, v: (L, D, K, H) a (L, D, r)     b (L, r, K, H)
    o: W (L, N, H, D)  a (L, N, H, r)  b (L, r, D)
    gate, up: (L, D, F), down: (L, F, D): a (L, in, r), b (L, r, out)

i.e. PEFT's lora_A.weight [r, in] is `a.T` and lora_B.weight [out, r] is `b.T` per layer, with
the in/out dimensions flattened the way export/hf.py flattens the base matrix (export/peft.py).
Initialisation follows PEFT's default (init_lora_weights=True): `a` is kaiming-uniform with
a=sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)); `b` is zero, so a fresh adapter leaves the
model exactly unchanged (W + 0 == W). Scale alpha / r (PEFT's default, not rsLoRA).

Why merge instead of a second forward path
------------------------------------------
The forward pass is `apply(merge(base, adapters))`, so there is ONE model function: pretrain,
SFT, DPO, eval and every exporter run the same code with or without LoRA, and what is exported
(merged weights) is bit-for-bit what was trained. The cost is one rank-r matmul per target
matrix per step (or per micro-batch) to form the delta, r * in * out multiply-adds, which is
negligible next to the forward pass over B x T tokens. Memory: the merged copy of the target
matrices exists during the step, and the backward pass materialises dL/dW (full size, as full
fine-tuning does) before contracting it to dL/da = s * dL/dW . b^T and dL/db = s * a^T . dL/dW.
That is about two transient copies of the target matrices, against the three persistent ones
(gradient + two Adam moments) that full fine-tuning keeps; for a 7B model in float32 that is
~2 x 26 GB of transients (sharded over fsdp x tensor like the base). Models far larger than
that would want the unmerged x @ a @ b path inside the layers (a model change, not done here).

Dropout
-------
PEFT's lora_dropout drops entries of the adapter's *input activations* x (y = W x + s b a
drop(x)), per token. With merged weights the adapter has no separate input, and a mask on the
rows of `a` (one mask per step, shared by every token) is a different regulariser
(DropConnect), so `dropout > 0` is refused with a ConfigError instead of silently meaning
something else. Doing it exactly needs the adapter path inside the attention/MLP layers and an
rng in the loss.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Mapping

from geb_jax.config_sections import Section
from geb_jax.errors import ConfigError

# target name -> (group under "layers", leaf, number of input dims after the layer axis,
# Hugging Face module path inside a decoder layer)
TARGETS: dict[str, tuple[str, str, int, str]] = {
    "q": ("attn", "q", 1, "self_attn.q_proj"),
    "k": ("attn", "k", 1, "self_attn.k_proj"),
    "v": ("attn", "v", 1, "self_attn.v_proj"),
    "o": ("attn", "o", 2, "self_attn.o_proj"),
    "gate": ("mlp", "gate", 1, "mlp.gate_proj"),
    "up": ("mlp", "up", 1, "mlp.up_proj"),
    "down": ("mlp", "down", 1, "mlp.down_proj"),
}
LAYERS_KEY = "layers"
A_KEY, B_KEY = "a", "b"
_RNG_SALT = 0x10A4  # folds the adapters' init key out of the model's, leaving the model's as is


@dataclasses.dataclass(frozen=True)
class LoraConfig(Section):
    """config.lora, validated. rank 0 = off (every weight trains, no adapters anywhere)."""
    SECTION = "lora"

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = tuple(TARGETS)

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, numbers.Integral) \
                or self.rank < 0:
            raise ConfigError(f"lora.rank must be an integer >= 0 (0 turns LoRA off), got "
                              f"{self.rank!r}.")
        object.__setattr__(self, "rank", int(self.rank))
        for name in ("alpha", "dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) \
                    or not math.isfinite(value):
                raise ConfigError(f"lora.{name} must be a finite number, got {value!r}.")
            object.__setattr__(self, name, float(value))
        targets = self.targets
        if isinstance(targets, str):
            targets = targets.split(",")
        targets = tuple(dict.fromkeys(t.strip() for t in targets if t.strip()))
        unknown = [t for t in targets if t not in TARGETS]
        if unknown:
            raise ConfigError(f"lora.targets names unknown matrices {unknown}; valid targets: "
                              f"{', '.join(TARGETS)} (comma-separated).")
        object.__setattr__(self, "targets", tuple(t for t in TARGETS if t in targets))
        if not self.enabled:
            return
        if not self.targets:
            raise ConfigError(f"lora.rank={self.rank} but lora.targets is empty; name some of "
                              f"{', '.join(TARGETS)}.")
        if self.alpha <= 0:
            raise ConfigError(f"lora.alpha must be positive (the update is scaled by alpha / "
                              f"rank), got {self.alpha}.")
        if self.dropout != 0.0:
            raise ConfigError(
                f"lora.dropout={self.dropout}: LoRA dropout is not supported. geb_jax trains "
                f"LoRA by merging W + (alpha/r) a b into the one model function, where the "
                f"adapter has no input of its own to drop (PEFT drops the adapter's input "
                f"activations per token); set lora.dropout=0.0 (model/lora.py explains).")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout,
                "targets": ",".join(self.targets)}


# ---- the adapters pytree ----------------------------------------------------------------------
def _base(params: Mapping, name: str):
    group, leaf, _, _ = TARGETS[name]
    try:
        return params[LAYERS_KEY][group][leaf]
    except (KeyError, TypeError):
        raise ConfigError(f"lora target {name!r}: the parameter tree has no "
                          f"{LAYERS_KEY}/{group}/{leaf}.") from None


def split_shape(name: str, shape) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    """(layers, input dims, output dims) of a target matrix's stacked shape."""
    n_in = TARGETS[name][2]
    return shape[0], tuple(shape[1:1 + n_in]), tuple(shape[1 + n_in:])


def _pair_shapes(name: str, shape, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    layers, ins, outs = split_shape(name, shape)
    return (layers, *ins, rank), (layers, rank, *outs)


def adapter_shapes(params: Mapping, lora: LoraConfig) -> dict:
    """{"layers": {group: {leaf: {"a": shape, "b": shape}}}} for the targets (shapes only)."""
    out: dict = {}
    for name in lora.targets:
        group, leaf, _, _ = TARGETS[name]
        a_shape, b_shape = _pair_shapes(name, _base(params, name).shape, lora.rank)
        out.setdefault(group, {})[leaf] = {A_KEY: a_shape, B_KEY: b_shape}
    return {LAYERS_KEY: out}


def init_adapters(params: Mapping, lora: LoraConfig, rng) -> dict:
    """PEFT's default init: a ~ U(+-1/sqrt(fan_in)) (kaiming-uniform, a=sqrt(5)), b = 0.

    `params` may hold arrays or ShapeDtypeStructs (only shapes are read). float32; target i
    draws from fold_in(rng, i) so that changing lora.targets leaves the other adapters' init.
    """
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

    out: dict = {}
    for name in lora.targets:
        group, leaf, _, _ = TARGETS[name]
        shape = _base(params, name).shape
        a_shape, b_shape = _pair_shapes(name, shape, lora.rank)
        bound = 1.0 / math.sqrt(math.prod(split_shape(name, shape)[1]))  # 1 / sqrt(fan_in)
        key = jax.random.fold_in(rng, list(TARGETS).index(name))
        out.setdefault(group, {})[leaf] = {
            A_KEY: jax.random.uniform(key, a_shape, jnp.float32, -bound, bound),
            B_KEY: jnp.zeros(b_shape, jnp.float32)}
    return {LAYERS_KEY: out}


def adapter_rng(model_init_rng):
    """The adapters' init key, derived from (not split off) the model's init key."""
    import jax  # pylint: disable=import-outside-toplevel
    return jax.random.fold_in(model_init_rng, _RNG_SALT)


def adapter_logical_axes(param_axes: Mapping, lora: LoraConfig) -> dict:
    """PartitionSpecs of logical names: a shares its base's input axes, b its output axes;
    the rank axis is never sharded."""
    from jax.sharding import PartitionSpec  # pylint: disable=import-outside-toplevel

    out: dict = {}
    for name in lora.targets:
        group, leaf, n_in, _ = TARGETS[name]
        spec = tuple(_base(param_axes, name))
        out.setdefault(group, {})[leaf] = {
            A_KEY: PartitionSpec(*spec[:1 + n_in], None),
            B_KEY: PartitionSpec(spec[0], None, *spec[1 + n_in:])}
    return {LAYERS_KEY: out}


def delta(name: str, a, b, scale: float):
    """scale * a @ b over the rank axis, in the base matrix's stacked shape (float32, HIGHEST
    precision: TPUs/GPUs would otherwise round the delta to bfloat16/TF32)."""
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

    n_in = TARGETS[name][2]
    n_out = b.ndim - 2
    letters = "abcdefghijk"[:n_in + n_out]
    ins, outs = letters[:n_in], letters[n_in:]
    product = jnp.einsum(f"l{ins}r,lr{outs}->l{ins}{outs}", a, b,
                         precision=jax.lax.Precision.HIGHEST)
    return product * jnp.asarray(scale, product.dtype)


def merge(params: Mapping, adapters: Mapping, lora: LoraConfig) -> dict:
    """params with W + (alpha/r) a @ b on every target; other leaves are shared, not copied.

    Pure and jit/grad-friendly (the gradient wrt the adapters flows through the delta).
    """
    if not lora.enabled:
        return params
    merged = dict(params)
    layers = dict(params[LAYERS_KEY])
    for name in lora.targets:
        group, leaf, _, _ = TARGETS[name]
        w = _base(params, name)
        pair = adapters[LAYERS_KEY][group][leaf]
        layers[group] = dict(layers[group])
        layers[group][leaf] = w + delta(name, pair[A_KEY], pair[B_KEY], lora.scale).astype(w.dtype)
    merged[LAYERS_KEY] = layers
    return merged


def num_adapter_params(adapters) -> int:
    import jax  # pylint: disable=import-outside-toplevel
    return sum(math.prod(x.shape) for x in jax.tree.leaves(adapters))


__all__ = ["LoraConfig", "TARGETS", "adapter_logical_axes", "adapter_rng", "adapter_shapes",
           "delta", "init_adapters", "merge", "num_adapter_params", "split_shape"]
