"""geb_jax.train.losses against float64 numpy implementations of the published formulas.

The fake model looks logits up in a table indexed by (token, position), so the logits of a
document do not depend on how it is packed, gradients flow into the table, and the numpy side
can rebuild every logit from the raw documents (not from the batch arrays the loss consumes).
The losses run under jax.jit, with beta / label smoothing / z-loss weight as traced arguments.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from geb_jax.train.losses import (LOSSES, check_batch_has_targets, cross_entropy_loss,
                                  dpo_loss, dpo_reference_logps, get_loss)

VOCAB = 11
MAX_POS = 32
TOL = dict(rtol=1e-5, atol=1e-5)
N_PAIRS, T_UNPACKED, T_PACKED = 6, 12, 24  # shared shapes: fewer compilations


def table_apply(params, tokens_bt, positions_bt, segment_ids_bt):
    del segment_ids_bt
    return params["table"][tokens_bt, positions_bt]


def make_table(seed, scale=2.0):
    rng = np.random.default_rng(seed)
    return {"table": (scale * rng.standard_normal((VOCAB, MAX_POS, VOCAB))).astype(np.float32)}


# Hyperparameters are traced arguments (only loss_type is static), so each batch layout compiles
# once per loss type rather than once per test case.
@jax.jit
def ce_jit(params, batch, z_loss_weight):
    return cross_entropy_loss(params, batch, table_apply, z_loss_weight=z_loss_weight)


@functools.partial(jax.jit, static_argnames=("loss_type",))
def dpo_jit(params, batch, reference_params, beta, label_smoothing, loss_type):
    return dpo_loss(params, batch, table_apply, reference_params=reference_params, beta=beta,
                    loss_type=loss_type, label_smoothing=label_smoothing)


# --------------------------------------------------------------------------------------------
# float64 numpy reference
# --------------------------------------------------------------------------------------------

def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return shifted - lse, (lse + x.max(axis=-1, keepdims=True))[..., 0]


def np_doc_logits(table, doc):
    """Logits at each position of an unpacked document, rebuilt from the table in float64."""
    return np.asarray(table, np.float64)[np.asarray(doc), np.arange(len(doc))]


def np_cross_entropy(logits, targets, mask, z_weight=0.0):
    logp, lse = np_log_softmax(logits)
    nll = -np.take_along_axis(logp, np.asarray(targets)[..., None], axis=-1)[..., 0]
    m = np.asarray(mask, np.float64)
    n = m.sum()
    ce = (nll * m).sum() / n
    return {"loss": ce, "z_loss": z_weight * (lse ** 2 * m).sum() / n, "perplexity": np.exp(ce),
            "accuracy": ((np.argmax(logits, -1) == targets) * m).sum() / n, "tokens": n}


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def np_response_logp(table, prompt, response, average):
    """log pi(response | prompt) = sum over response tokens; / len(response) if average."""
    seq = np.concatenate([prompt, response])
    logp, _ = np_log_softmax(np_doc_logits(table, seq))
    total = sum(logp[j - 1, seq[j]] for j in range(len(prompt), len(seq)))
    return total / len(response) if average else total


def np_dpo(pairs, table, ref, beta, loss_type, ls):
    """pairs: list of (prompt, chosen, rejected); ref: (ref_c, ref_r) arrays, or a table."""
    avg = loss_type == "ipo"
    pi_c = np.array([np_response_logp(table, p, c, avg) for p, c, _ in pairs])
    pi_r = np.array([np_response_logp(table, p, r, avg) for p, _, r in pairs])
    if isinstance(ref, dict):
        ref_c = np.array([np_response_logp(ref["table"], p, c, avg) for p, c, _ in pairs])
        ref_r = np.array([np_response_logp(ref["table"], p, r, avg) for p, _, r in pairs])
    else:
        ref_c, ref_r = (np.asarray(x, np.float64) for x in ref)
    h = (pi_c - pi_r) - (ref_c - ref_r)
    if loss_type == "sigmoid":  # DPO eq. 7; cDPO with label smoothing
        per_pair = -(1 - ls) * np_log_sigmoid(beta * h) - ls * np_log_sigmoid(-beta * h)
        dloss_dh = -(1 - ls) * beta * np_sigmoid(-beta * h) + ls * beta * np_sigmoid(beta * h)
    elif loss_type == "ipo":  # IPO eq. 17
        per_pair = (h - 1 / (2 * beta)) ** 2
        dloss_dh = 2 * (h - 1 / (2 * beta))
    else:  # hinge
        per_pair = np.maximum(0.0, 1 - beta * h)
        dloss_dh = -beta * (1 - beta * h > 0)
    rc, rr = beta * (pi_c - ref_c), beta * (pi_r - ref_r)
    metrics = {"loss": per_pair.mean(), "rewards/chosen": rc.mean(), "rewards/rejected": rr.mean(),
               "rewards/accuracies": (rc > rr).mean(), "rewards/margins": (rc - rr).mean(),
               "logps/chosen": pi_c.mean(), "logps/rejected": pi_r.mean(),
               "pairs": float(len(pairs))}
    return metrics, {"h": h, "dloss_dh": dloss_dh / len(pairs)}


# --------------------------------------------------------------------------------------------
# batch builders (the data pipeline's layout)
# --------------------------------------------------------------------------------------------

def pack_documents(rows_of_docs, t):
    """Rows of packed documents -> LM batch: targets[t] = inputs[t + 1] within a document;
    loss_mask 0 on each document's last token (its target is the next document) and padding."""
    b = len(rows_of_docs)
    out = {k: np.zeros((b, t), np.int32) for k in ("inputs", "targets", "positions", "segment_ids")}
    out["loss_mask"] = np.zeros((b, t), np.float32)
    for row, docs in enumerate(rows_of_docs):
        if not docs:
            continue  # an all-padding row
        stream = np.concatenate(docs)
        n = len(stream)
        assert n <= t
        out["inputs"][row, :n] = stream
        out["targets"][row, :n - 1] = stream[1:]
        start = 0
        for i, doc in enumerate(docs):
            span = slice(start, start + len(doc))
            out["positions"][row, span] = np.arange(len(doc))
            out["segment_ids"][row, span] = i + 1
            out["loss_mask"][row, start:start + len(doc) - 1] = 1.0
            start += len(doc)
    return out


def random_pairs(n, seed):
    rng = np.random.default_rng(seed)
    tok = lambda k: rng.integers(0, VOCAB, size=int(k))
    return [(tok(rng.integers(1, 5)), tok(rng.integers(1, 7)), tok(rng.integers(1, 7)))
            for _ in range(n)]


def dpo_side(rows_of_seqs, t, packed):
    """rows of [(prompt, response), ...] -> inputs/targets/positions/segment_ids/loss_mask
    (+ pair_ids if packed); loss_mask is 1 where the target is a response token."""
    b = len(rows_of_seqs)
    out = {k: np.zeros((b, t), np.int32)
           for k in ("inputs", "targets", "positions", "segment_ids", "pair_ids")}
    out["loss_mask"] = np.zeros((b, t), np.float32)
    for row, seqs in enumerate(rows_of_seqs):
        start = 0
        for k, (prompt, response) in enumerate(seqs, start=1):
            seq = np.concatenate([prompt, response])
            n = len(seq) - 1  # inputs seq[:-1], targets seq[1:]
            span = slice(start, start + n)
            assert start + n <= t
            out["inputs"][row, span] = seq[:-1]
            out["targets"][row, span] = seq[1:]
            out["positions"][row, span] = np.arange(n)
            out["segment_ids"][row, span] = k
            out["pair_ids"][row, span] = k
            out["loss_mask"][row, start + len(prompt) - 1:start + n] = 1.0
            start += n
    if not packed:
        del out["pair_ids"]
    return out


def dpo_batch(pair_rows, t, packed, t_rejected=None):
    """pair_rows: rows of pairs; unpacked needs exactly one pair per row."""
    if not packed:
        assert all(len(r) == 1 for r in pair_rows)
    chosen = dpo_side([[(p, c) for p, c, _ in row] for row in pair_rows], t, packed)
    rejected = dpo_side([[(p, r) for p, _, r in row] for row in pair_rows], t_rejected or t, packed)
    batch = {f"chosen_{k}": v for k, v in chosen.items()}
    batch.update({f"rejected_{k}": v for k, v in rejected.items()})
    return batch


def assert_metrics(ours, ref, keys=None):
    for key in keys or ref:
        np.testing.assert_allclose(float(ours[key]), ref[key], err_msg=key, **TOL)


# --------------------------------------------------------------------------------------------
# cross-entropy (pretrain / SFT)
# --------------------------------------------------------------------------------------------

def random_lm_batch(b, t, seed, mask_dtype=np.float32, p_keep=0.6):
    rng = np.random.default_rng(seed)
    return {"inputs": rng.integers(0, VOCAB, (b, t)).astype(np.int32),
            "targets": rng.integers(0, VOCAB, (b, t)).astype(np.int32),
            "positions": np.broadcast_to(np.arange(t), (b, t)).astype(np.int32),
            "segment_ids": np.ones((b, t), np.int32),
            "loss_mask": (rng.random((b, t)) < p_keep).astype(mask_dtype)}


@pytest.mark.parametrize("mask_dtype", [np.float32, np.bool_])
@pytest.mark.parametrize("z_weight", [0.0, 1e-1])
def test_cross_entropy_random_mask_matches_numpy(mask_dtype, z_weight):
    params = make_table(0, scale=3.0)
    batch = random_lm_batch(3, 16, seed=1, mask_dtype=mask_dtype)
    loss, metrics = ce_jit(params, batch, z_weight)
    logits = np.asarray(params["table"], np.float64)[batch["inputs"], batch["positions"]]
    ref = np_cross_entropy(logits, batch["targets"], batch["loss_mask"], z_weight)
    assert_metrics(metrics, ref)
    np.testing.assert_allclose(float(loss), ref["loss"] + ref["z_loss"], **TOL)
    assert 0.0 < ref["accuracy"] < 1.0  # the accuracy check is not vacuous
    assert loss.dtype == jnp.float32


def test_cross_entropy_packed_documents_match_per_document_numpy():
    rng = np.random.default_rng(2)
    docs = [rng.integers(0, VOCAB, n) for n in (5, 7, 9, 4)]
    params = make_table(3)
    # Two packed rows (+ a padding row), and the same documents unpacked: same shapes.
    packed = pack_documents([[docs[0], docs[1]], [docs[2], docs[3]], [], []], t=16)
    unpacked = pack_documents([[d] for d in docs], t=16)
    # Reference straight from the documents: next-token loss inside each document only.
    nll, correct = [], []
    for doc in docs:
        logp, _ = np_log_softmax(np_doc_logits(params["table"], doc))
        for i in range(len(doc) - 1):
            nll.append(-logp[i, doc[i + 1]])
            correct.append(np.argmax(logp[i]) == doc[i + 1])
    ref = {"loss": np.mean(nll), "accuracy": np.mean(correct), "tokens": float(len(nll))}
    assert_metrics(ce_jit(params, packed, 0.0)[1], ref)
    assert_metrics(ce_jit(params, unpacked, 0.0)[1], ref)


def test_sft_mask_ignores_non_assistant_targets():
    params = make_table(4)
    batch = random_lm_batch(3, 16, seed=5)
    mask = np.zeros((3, 16), np.float32)
    mask[0, 3:7] = 1.0  # assistant span of row 0
    mask[1, 1:3] = 1.0  # two assistant turns in row 1
    mask[1, 8:11] = 1.0  # row 2: no assistant token at all
    batch["loss_mask"] = mask
    loss, metrics = ce_jit(params, batch, 0.0)
    logits = np.asarray(params["table"], np.float64)[batch["inputs"], batch["positions"]]
    assert_metrics(metrics, np_cross_entropy(logits, batch["targets"], mask))
    # Changing targets of user / system tokens changes nothing; changing an assistant one does.
    other = dict(batch, targets=np.where(mask > 0, batch["targets"], (batch["targets"] + 1) % VOCAB))
    np.testing.assert_allclose(float(ce_jit(params, other, 0.0)[0]), float(loss), rtol=1e-7)
    other = dict(batch, targets=batch["targets"].copy())
    other["targets"][0, 4] = (other["targets"][0, 4] + 1) % VOCAB
    assert abs(float(ce_jit(params, other, 0.0)[0]) - float(loss)) > 1e-3


def test_all_masked_batch_gives_zero_loss_and_host_check_raises():
    params = make_table(6)
    batch = random_lm_batch(3, 16, seed=7)
    batch["loss_mask"] = np.zeros_like(batch["loss_mask"])
    loss, metrics = ce_jit(params, batch, 1e-2)
    assert float(loss) == 0.0 and float(metrics["tokens"]) == 0.0
    assert all(np.isfinite(float(v)) for v in metrics.values())
    grads = jax.jit(jax.grad(lambda p: ce_jit(p, batch, 1e-2)[0]))(params)
    assert np.all(np.asarray(grads["table"]) == 0.0)
    with pytest.raises(ValueError, match="loss_mask"):
        check_batch_has_targets(batch)
    check_batch_has_targets(random_lm_batch(3, 16, seed=7))  # a normal batch passes


def test_cross_entropy_gradient_wrt_logits():
    rng = np.random.default_rng(8)
    b, t = 2, 6
    logits = (3 * rng.standard_normal((b, t, VOCAB))).astype(np.float32)
    batch = random_lm_batch(b, t, seed=9)
    apply = lambda p, *_: p["logits"]
    grad_fn = jax.jit(jax.grad(lambda p, z: cross_entropy_loss(p, batch, apply, z_loss_weight=z)[0]))
    logp, lse = np_log_softmax(logits)
    softmax = np.exp(logp)
    onehot = np.eye(VOCAB)[batch["targets"]]
    m = batch["loss_mask"][..., None].astype(np.float64)
    for z_weight in (0.0, 0.05):
        grad = grad_fn({"logits": logits}, z_weight)["logits"]
        ref = (softmax - onehot) * m / m.sum() + z_weight * 2 * lse[..., None] * softmax * m / m.sum()
        np.testing.assert_allclose(np.asarray(grad), ref, rtol=1e-5, atol=1e-6)


def test_bfloat16_logits_are_upcast():
    params = {"table": make_table(10)["table"].astype(jnp.bfloat16)}
    batch = random_lm_batch(3, 16, seed=11)
    loss, metrics = ce_jit(params, batch, 1e-1)
    assert loss.dtype == jnp.float32
    logits = np.asarray(params["table"].astype(np.float32), np.float64)[
        batch["inputs"], batch["positions"]]
    assert_metrics(metrics, np_cross_entropy(logits, batch["targets"], batch["loss_mask"], 1e-1))


def test_large_logits_are_stable():
    """exp(300) overflows float32: the log-softmax must subtract the max."""
    params = {"table": make_table(12)["table"] + np.float32(300.0)}
    batch = random_lm_batch(3, 16, seed=13)
    loss, metrics = ce_jit(params, batch, 1e-4)
    logits = np.asarray(params["table"], np.float64)[batch["inputs"], batch["positions"]]
    ref = np_cross_entropy(logits, batch["targets"], batch["loss_mask"], 1e-4)
    assert np.isfinite(float(loss))
    assert_metrics(metrics, ref)


def test_registry():
    assert LOSSES["pretrain"] is cross_entropy_loss and LOSSES["sft"] is cross_entropy_loss
    assert get_loss("dpo") is dpo_loss and get_loss("sft") is cross_entropy_loss
    with pytest.raises(ValueError, match="dpo.*pretrain.*sft"):
        get_loss("ppo")


# --------------------------------------------------------------------------------------------
# DPO
# --------------------------------------------------------------------------------------------

BETA = 0.3
DPO_CASES = [("sigmoid", 0.0), ("sigmoid", 0.1), ("sigmoid", 0.3), ("ipo", 0.0), ("hinge", 0.0)]
PACKED_ROWS = [[0, 1], [2], [3, 4, 5], []]  # pair indices per packed row; the last row: padding
P_SLOTS = 3


def unpacked_dpo_batch(pairs):
    return dpo_batch([[p] for p in pairs], t=T_UNPACKED, packed=False)


def packed_dpo_batch(pairs):
    return dpo_batch([[pairs[i] for i in row] for row in PACKED_ROWS], t=T_PACKED, packed=True)


def to_slots(per_pair):
    """(n_pairs,) -> (rows, P_SLOTS) in the packed layout; junk in the unused slots."""
    slots = np.full((len(PACKED_ROWS), P_SLOTS), 123.0, np.float32)
    for row, members in enumerate(PACKED_ROWS):
        for k, i in enumerate(members):
            slots[row, k] = per_pair[i]
    return slots


@pytest.mark.parametrize("loss_type,ls", DPO_CASES)
@pytest.mark.parametrize("ref_source", ["batch", "params"])
@pytest.mark.parametrize("layout", ["unpacked", "packed"])
def test_dpo_matches_numpy(loss_type, ls, ref_source, layout):
    """Every metric vs numpy; the packed layout gives the unpacked answer."""
    pairs = random_pairs(N_PAIRS, seed=12)
    params, ref_params = make_table(13), make_table(14)
    batch = unpacked_dpo_batch(pairs) if layout == "unpacked" else packed_dpo_batch(pairs)
    reference_params = ref_params
    if ref_source == "batch":  # arbitrary precomputed values, used as given
        rng = np.random.default_rng(15)
        ref = (rng.normal(-12, 4, N_PAIRS), rng.normal(-12, 4, N_PAIRS))
        if loss_type == "ipo":
            ref = (ref[0] / 5, ref[1] / 5)
        place = (lambda x: x.astype(np.float32)) if layout == "unpacked" else to_slots
        batch.update(reference_chosen_logps=place(ref[0]), reference_rejected_logps=place(ref[1]))
        reference_params = None
    else:
        ref = ref_params
    loss, metrics = dpo_jit(params, batch, reference_params, BETA, ls, loss_type=loss_type)
    ref_metrics, extra = np_dpo(pairs, params["table"], ref, BETA, loss_type, ls)
    assert_metrics(metrics, ref_metrics)
    np.testing.assert_allclose(float(loss), ref_metrics["loss"], **TOL)
    assert 0.0 < ref_metrics["rewards/accuracies"] < 1.0  # not vacuous
    if loss_type == "hinge":  # both sides of the relu are exercised
        assert np.any(1 - BETA * extra["h"] > 0) and np.any(1 - BETA * extra["h"] < 0)
    check_batch_has_targets(batch)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_reference_logps_and_explicit_slot_count(loss_type):
    """Precomputing the reference (TRL: precompute_ref_log_probs) gives the same loss as
    computing it in the step; IPO's precomputed values are token averages, as in TRL."""
    pairs = random_pairs(N_PAIRS, seed=12)
    params, ref_params = make_table(13), make_table(14)
    ref_metrics, _ = np_dpo(pairs, params["table"], ref_params, BETA, loss_type, 0.0)
    unpacked = unpacked_dpo_batch(pairs)
    ref_fn = jax.jit(dpo_reference_logps, static_argnames=("apply", "loss_type", "max_pairs_per_row"))
    ref = ref_fn(ref_params, unpacked, table_apply, loss_type=loss_type)
    avg = loss_type == "ipo"
    np.testing.assert_allclose(
        np.asarray(ref["reference_chosen_logps"]),
        [np_response_logp(ref_params["table"], p, c, avg) for p, c, _ in pairs], **TOL)
    assert_metrics(dpo_jit(params, {**unpacked, **ref}, None, BETA, 0.0, loss_type)[1],
                   ref_metrics)
    packed = packed_dpo_batch(pairs)
    ref_packed = ref_fn(ref_params, packed, table_apply, loss_type=loss_type,
                        max_pairs_per_row=P_SLOTS)
    assert ref_packed["reference_chosen_logps"].shape == (len(PACKED_ROWS), P_SLOTS)
    # The slot count comes from the reference arrays' width here (not from T = 24).
    assert_metrics(dpo_jit(params, {**packed, **ref_packed}, None, BETA, 0.0, loss_type)[1],
                   ref_metrics)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_gradient_matches_numpy(loss_type):
    """d loss / d table = sum over tokens of dloss/dh * dh/dlogits, dh/dlogits = +-(onehot -
    softmax) on target tokens (/ n tokens for IPO); nothing flows to the reference."""
    pairs = random_pairs(N_PAIRS, seed=16)
    params, ref_params = make_table(17), make_table(18)
    batch = unpacked_dpo_batch(pairs)
    grad_fn = jax.jit(jax.grad(
        lambda p, r, ls: dpo_jit(p, batch, r, BETA, ls, loss_type=loss_type)[0], argnums=(0, 1)))
    for ls in ((0.0, 0.2) if loss_type == "sigmoid" else (0.0,)):
        grad_p, grad_r = grad_fn(params, ref_params, ls)
        _, extra = np_dpo(pairs, params["table"], ref_params, BETA, loss_type, ls)
        ref_grad = np.zeros((VOCAB, MAX_POS, VOCAB))
        for i, (prompt, chosen, rejected) in enumerate(pairs):
            for sign, response in ((1.0, chosen), (-1.0, rejected)):
                seq = np.concatenate([prompt, response])
                logp, _ = np_log_softmax(np_doc_logits(params["table"], seq))
                scale = extra["dloss_dh"][i] * sign / (len(response) if loss_type == "ipo" else 1)
                for j in range(len(prompt), len(seq)):
                    ref_grad[seq[j - 1], j - 1] += scale * (
                        np.eye(VOCAB)[seq[j]] - np.exp(logp[j - 1]))
        np.testing.assert_allclose(np.asarray(grad_p["table"]), ref_grad, rtol=1e-4, atol=1e-6)
        assert np.abs(ref_grad).max() > 1e-3
        assert np.all(np.asarray(grad_r["table"]) == 0.0)


def test_dpo_different_lengths_and_padding_rows():
    pairs = random_pairs(3, seed=22)
    params, ref_params = make_table(23), make_table(24)
    # One pair per row (built with the packed builder, then pair ids dropped: the unpacked
    # layout), chosen T=12 and rejected T=14, and an all-padding fourth row that must not count.
    batch = dpo_batch([[p] for p in pairs] + [[]], t=12, packed=True, t_rejected=14)
    batch = {k: v for k, v in batch.items() if not k.endswith("pair_ids")}
    _, metrics = dpo_jit(params, batch, ref_params, 0.1, 0.0, loss_type="sigmoid")
    ref_metrics, _ = np_dpo(pairs, params["table"], ref_params, 0.1, "sigmoid", 0.0)
    assert_metrics(metrics, ref_metrics)


def test_dpo_without_pairs_and_errors():
    pairs = random_pairs(N_PAIRS, seed=25)
    params = make_table(26)
    batch = unpacked_dpo_batch(pairs)
    empty = dict(batch, chosen_loss_mask=np.zeros_like(batch["chosen_loss_mask"]),
                 rejected_loss_mask=np.zeros_like(batch["rejected_loss_mask"]))
    loss, metrics = dpo_jit(params, empty, params, BETA, 0.0, loss_type="sigmoid")
    assert float(loss) == 0.0 and float(metrics["pairs"]) == 0.0
    assert all(np.isfinite(float(v)) for v in metrics.values())
    with pytest.raises(ValueError, match="loss_mask"):
        check_batch_has_targets(empty)
    half = dict(batch, rejected_loss_mask=empty["rejected_loss_mask"])
    with pytest.raises(ValueError, match="loss_mask"):
        check_batch_has_targets(half)
    packed = packed_dpo_batch(pairs)
    broken = dict(packed, rejected_pair_ids=np.minimum(packed["rejected_pair_ids"], 1))
    with pytest.raises(ValueError, match="pair"):
        check_batch_has_targets(broken)
    with pytest.raises(ValueError, match="max_pairs_per_row"):
        check_batch_has_targets(packed, max_pairs_per_row=2)
    with pytest.raises(ValueError, match="reference_params"):
        dpo_loss(params, batch, table_apply)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(params, batch, table_apply, reference_params=params, loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(params, batch, table_apply, reference_params=params, loss_type="ipo",
                 label_smoothing=0.1)


# --------------------------------------------------------------------------------------------
# with the real model
# --------------------------------------------------------------------------------------------

def test_real_model_packing_does_not_change_losses(tiny_config):
    """The model's segment ids / positions and the losses' masks / pair ids agree."""
    from geb_jax.model import abstract_params, make_apply
    apply = make_apply(tiny_config)
    rng = np.random.default_rng(27)
    # Random parameters of the right shapes (init_params is slow to run on a loaded CPU).
    random_like = lambda a: (np.ones(a.shape) if a.ndim <= 2 and "scale" in str(a) else
                             0.3 * rng.standard_normal(a.shape)).astype(np.float32)
    params = jax.tree_util.tree_map(random_like, abstract_params(tiny_config))
    ref_params = jax.tree_util.tree_map(random_like, abstract_params(tiny_config))
    ce = jax.jit(lambda p, b: cross_entropy_loss(p, b, apply))
    docs = [rng.integers(0, tiny_config.vocab_size, n) for n in (6, 9, 5)]
    _, packed = ce(params, pack_documents([docs, [], []], t=24))
    _, unpacked = ce(params, pack_documents([[d] for d in docs], t=24))
    assert float(packed["tokens"]) == float(unpacked["tokens"]) == 17
    np.testing.assert_allclose(float(packed["loss"]), float(unpacked["loss"]), rtol=1e-5)

    tok = lambda k: rng.integers(0, tiny_config.vocab_size, k)
    pairs = [(tok(3), tok(5), tok(4)), (tok(2), tok(6), tok(3))]
    dpo = jax.jit(lambda p, b: dpo_loss(p, b, apply, reference_params=ref_params, beta=0.5))
    _, d_packed = dpo(params, dpo_batch([pairs, []], 24, packed=True))
    unpacked = dpo_batch([[p] for p in pairs], 24, packed=True)  # one pair per row
    _, d_unpacked = dpo(params, unpacked)
    for key in d_unpacked:
        np.testing.assert_allclose(float(d_packed[key]), float(d_unpacked[key]),
                                   rtol=1e-4, atol=1e-5, err_msg=key)
