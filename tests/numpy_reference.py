"""An independent float64 numpy Llama forward pass, written from the papers, for parity tests.

Deliberately shares no code with geb_jax.model: loops over heads and documents instead of
einsums over masks, so that a mistake in one is unlikely to be repeated in the other.
"""
import numpy as np


def rms_norm(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def rope(x_tnh, positions, theta):
    """Rotate pairs (i, i + H/2) by angle position * theta^(-2i/H)."""
    t, n, h = x_tnh.shape
    out = np.empty_like(x_tnh)
    for i in range(h // 2):
        angle = positions * theta ** (-2.0 * i / h)  # (T,)
        c, s = np.cos(angle)[:, None], np.sin(angle)[:, None]
        a, b = x_tnh[:, :, i], x_tnh[:, :, i + h // 2]
        out[:, :, i] = a * c - b * s
        out[:, :, i + h // 2] = b * c + a * s
    return out


def attention_one_row(x_td, layer, cfg, positions, segments):
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


def forward(params, cfg, tokens_bt, positions_bt, segments_bt):
    """float64 logits (B, T, V)."""
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
                x = x + attention_one_row(rms_norm(x, n1, cfg.norm_eps), layer, cfg, pos, seg)
                x = x + swiglu(rms_norm(x, n2, cfg.norm_eps), layer)
            else:
                x = rms_norm(x + attention_one_row(x, layer, cfg, pos, seg), n1, cfg.norm_eps)
                x = rms_norm(x + swiglu(x, layer), n2, cfg.norm_eps)
        x = rms_norm(x, to64(p["final_norm"]["scale"]), cfg.norm_eps)
        head = to64(p["embedding"]).T if cfg.tie_embeddings else to64(p["lm_head"])
        logits.append(x @ head)
    return np.stack(logits)
