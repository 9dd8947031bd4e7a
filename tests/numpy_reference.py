"""An independent float64 numpy Llama forward pass, written from the papers, for parity tests.

Deliberately shares no code with geb_jax.model: loops over heads and documents instead of
einsums over masks, so that a mistake in one is unlikely to be repeated in the other.
"""
import numpy as np


def rms_norm(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _rotate_pairs(x_tnh, positions, theta, pair):
    """Rotate the pairs pair(i, H) = (a, b) by angle position * theta^(-2i/H), i < H/2."""
    t, n, h = x_tnh.shape
    out = np.empty_like(x_tnh)
    for i in range(h // 2):
        angle = np.asarray(positions, np.float64) * theta ** (-2.0 * i / h)  # (T,)
        c, s = np.cos(angle)[:, None], np.sin(angle)[:, None]
        a, b = pair(i, h)
        out[:, :, a] = x_tnh[:, :, a] * c - x_tnh[:, :, b] * s
        out[:, :, b] = x_tnh[:, :, b] * c + x_tnh[:, :, a] * s
    return out


def rope(x_tnh, positions, theta):
    """Hugging Face's rotate-half layout (geb_jax's): pairs (i, i + H/2)."""
    return _rotate_pairs(x_tnh, positions, theta, lambda i, h: (i, i + h // 2))


def interleaved_rope(x_tnh, positions, theta):
    """Meta's / llama.cpp's interleaved layout: pairs (2i, 2i + 1). The wrong layout for
    geb_jax's weights; tests use it to show how far a layout mix-up moves the logits."""
    return _rotate_pairs(x_tnh, positions, theta, lambda i, h: (2 * i, 2 * i + 1))


def attention_one_row(x_td, layer, cfg, positions, segments, rope=rope):
    q = np.einsum("td,dnh->tnh", x_td, layer["q"])
    k = np.einsum("td,dkh->tkh", x_td, layer["k"])
    v = np.einsum("td,dkh->tkh", x_td, layer["v"])
    q, k = rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta)
    t = x_td.shape[0]
    group = cfg.n_heads // cfg.n_kv_heads
    out = np.zeros_like(q)
    for head in range(cfg.n_heads):
        kv = head // group
        for i in range(t):
            allowed = [j for j in range(i + 1) if segments[j] == segments[i]]
            scores = np.array([q[i, head] @ k[j, kv] for j in allowed]) / np.sqrt(cfg.head_dim)
            weights = np.exp(scores - scores.max())
            weights /= weights.sum()
            out[i, head] = sum(w * v[j, kv] for w, j in zip(weights, allowed))
    return np.einsum("tnh,nhd->td", out, layer["o"])


def swiglu(x, layer):
    gate = x @ layer["gate"]
    return ((gate / (1.0 + np.exp(-gate))) * (x @ layer["up"])) @ layer["down"]


def forward(params, cfg, tokens_bt, positions_bt, segments_bt, rope=rope):
    """float64 logits (B, T, V); `rope` picks the layout (rope or interleaved_rope)."""
    p = {k: v for k, v in params.items()}
    to64 = lambda a: np.asarray(a, dtype=np.float64)
    logits = []
    for row in range(tokens_bt.shape[0]):
        x = to64(p["embedding"])[tokens_bt[row]]
        for l in range(cfg.n_layers):
            layer = {k: to64(v[l]) for k, v in {**p["layers"]["attn"], **p["layers"]["mlp"]}.items()}
            n1 = to64(p["layers"]["attn_norm"]["scale"][l])
            n2 = to64(p["layers"]["mlp_norm"]["scale"][l])
            pos, seg = np.asarray(positions_bt[row], np.float64), np.asarray(segments_bt[row])
            if cfg.norm_position == "pre":
                x = x + attention_one_row(rms_norm(x, n1, cfg.norm_eps), layer, cfg, pos, seg,
                                           rope)
                x = x + swiglu(rms_norm(x, n2, cfg.norm_eps), layer)
            else:
                x = rms_norm(x + attention_one_row(x, layer, cfg, pos, seg, rope), n1,
                             cfg.norm_eps)
                x = rms_norm(x + swiglu(x, layer), n2, cfg.norm_eps)
        x = rms_norm(x, to64(p["final_norm"]["scale"]), cfg.norm_eps)
        head = to64(p["embedding"]).T if cfg.tie_embeddings else to64(p["lm_head"])
        logits.append(x @ head)
    return np.stack(logits)
