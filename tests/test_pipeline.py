"""Data pipeline tests (geb_jax.data.pipeline, geb_jax.data.chat, geb_jax.data.demo_tasks).

The checks are independent of the implementation: documents are rebuilt from the packed rows
(segment ids, positions, bos) and compared with the tokenizer's own encoding of the texts, and
loss masks are recomputed from the tokens. One tiny tokenizer (vocab 512) is trained once per
module on the built-in corpus (~1 s).
"""
import collections
import json
import re

import grain
import numpy as np
import pytest

from geb_jax.data import chat_pipeline as CP
from geb_jax.data import pipeline as P
from geb_jax.data import pretrain_pipeline as PP
from geb_jax.data.chat import (chat_prompt, encode_chat, encode_reply, render_chat,
                               validate_messages)
from geb_jax.data.corpus import builtin_documents
from geb_jax.data.demo_tasks import builtin_dpo_pairs, builtin_sft_conversations
from geb_jax.data.tokenizer import builtin_tokenizer

SEQ = 32


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return builtin_tokenizer(512, cache_dir=str(tmp_path_factory.mktemp("tok512")))


@pytest.fixture(scope="module")
def texts():
    """~70 distinct documents: short, long (> several rows), Chinese, code, one empty."""
    out = [f"doc {i}: " + " ".join(["alpha", "beta", "gamma"][: i % 4]) * (1 + i % 5)
           for i in range(40)]
    for i, d in enumerate(builtin_documents("valid")):
        if i >= 28:
            break
        out.append(f"[{i}] " + d["text"][: 60 + 37 * i])  # up to ~1100 chars: many rows
    out.append("")  # empty documents are skipped
    assert len(set(out)) == len(out)
    return out


# ----------------------------------------------------------------------------- helpers
def collect(ds, n=None):
    it = iter(ds)
    out = []
    for b in it:
        out.append({k: np.asarray(v) for k, v in b.items()})
        if n is not None and len(out) >= n:
            break
    return out


def rows(batches, prefix=""):
    for b in batches:
        for r in range(b[prefix + "inputs"].shape[0]):
            yield {k[len(prefix):]: v[r] for k, v in b.items() if k.startswith(prefix)}


def segments(row):
    """[(seg_id, start, stop)] over the inputs of a row (0 = padding excluded)."""
    seg = row["segment_ids"]
    out = []
    for s in np.unique(seg[seg > 0]):
        idx = np.nonzero(seg == s)[0]
        assert np.array_equal(idx, np.arange(idx[0], idx[-1] + 1)), "segment not contiguous"
        out.append((int(s), int(idx[0]), int(idx[-1]) + 1))
    return out


def full_row(row):
    """The seq_len + 1 tokens of the packed row (inputs plus the last target)."""
    return np.concatenate([row["inputs"], row["targets"][-1:]])


def docs_from_stream(batches, tok):
    """All non-pad tokens of the packed stream, in order, cut at bos: the documents."""
    stream = [int(t) for r in rows(batches) for t in full_row(r) if t != tok.pad_id]
    docs, cur = [], None
    for t in stream:
        if t == tok.bos_id:
            if cur is not None:
                docs.append(tuple(cur))
            cur = []
        assert cur is not None, "stream does not start with bos"
        cur.append(t)
    if cur:
        docs.append(tuple(cur))
    return docs


def encodings(tok, texts):
    return sorted(tuple(tok.encode(t, add_bos=True, add_eos=True)) for t in texts if t)


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ----------------------------------------------------------------------------- packing
def test_pretrain_packing_reconstructs_documents(tok, texts):
    ds = PP.pretrain_dataset(texts, tok, seq_len=SEQ, batch_size=4, seed=3, num_epochs=1,
                            drop_remainder=False)
    batches = collect(ds)
    assert set(batches[0]) == set(P.BATCH_KEYS)
    for b in batches:
        assert b["inputs"].dtype == np.int32 and b["inputs"].shape[1] == SEQ
        assert b["loss_mask"].dtype == np.float32
    n_rows = 0
    for row in rows(batches):
        n_rows += 1
        inp, tgt, seg, pos, mask = (row[k] for k in ("inputs", "targets", "segment_ids",
                                                     "positions", "loss_mask"))
        np.testing.assert_array_equal(inp[1:], tgt[:-1])  # shift by one
        segs = segments(row)
        assert [s for s, _, _ in segs] == list(range(1, len(segs) + 1))
        pad = seg == 0
        assert np.all(inp[pad] == tok.pad_id)
        if pad.any():  # padding only at the tail
            assert np.all(pad[np.argmax(pad):])
        for k, (s, a, b) in enumerate(segs):
            np.testing.assert_array_equal(pos[a:b], np.arange(b - a))  # restart at 0
            # a segment starts a document (bos) or continues one at the start of a row
            assert inp[a] == tok.bos_id or k == 0
            # and ends it (eos) or runs to the end of the row
            assert inp[b - 1] == tok.eos_id or b == SEQ
        # loss mask: 0 exactly on padding and where the target is in another document
        same = (seg[:-1] == seg[1:]) & (seg[:-1] != 0)
        np.testing.assert_array_equal(mask[:-1], same)
        expect = (seg != 0) & (inp != tok.eos_id) & (tgt != tok.pad_id)
        np.testing.assert_array_equal(mask, expect.astype(np.float32))
    # no token lost or added: the documents rebuilt from the stream are exactly the encodings
    assert sorted(docs_from_stream(batches, tok)) == encodings(tok, texts)
    n_tokens = sum(len(e) for e in encodings(tok, texts))
    assert n_rows == -(-n_tokens // (SEQ + 1))  # concat-then-split: padding only at the end


def test_long_document_is_split_into_segments(tok):
    text = "A long document. " * 40
    ids = tok.encode(text, add_bos=True, add_eos=True)
    assert len(ids) > 3 * (SEQ + 1)
    batches = collect(PP.pretrain_dataset([text], tok, seq_len=SEQ, batch_size=2, seed=0,
                                         num_epochs=1, drop_remainder=False, prefetch=0))
    chunks = [full_row(r)[: (r["segment_ids"] > 0).sum() + 1] for r in rows(batches)]
    for r in rows(batches):
        np.testing.assert_array_equal(r["positions"][r["segment_ids"] > 0],
                                      np.arange((r["segment_ids"] > 0).sum()))
    rebuilt = [int(t) for c in chunks for t in c if t != tok.pad_id]
    assert rebuilt == ids


# ----------------------------------------------------------------------------- determinism
def test_determinism_and_seed(tok, texts):
    def first(seed):
        return collect(PP.pretrain_dataset(texts, tok, seq_len=SEQ, batch_size=4, seed=seed),
                       n=6)

    a, b, c = first(5), first(5), first(6)
    assert_batches_equal(a, b)
    assert any(not np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, c))


def test_epochs_are_reshuffled(tok, texts):
    ds = PP.pretrain_dataset(texts, tok, seq_len=SEQ, batch_size=4, seed=1, num_epochs=2,
                            drop_remainder=False)
    docs = docs_from_stream(collect(ds), tok)
    n = len(encodings(tok, texts))
    assert sorted(docs[:n]) == sorted(docs[n:]) == encodings(tok, texts)
    assert docs[:n] != docs[n:]


# ----------------------------------------------------------------------------- resume
def _check_resume(make, n, m):
    it = iter(make())
    for _ in range(n):
        next(it)
    state = json.loads(json.dumps(P.iterator_state(it)))
    expected = [next(it) for _ in range(m)]
    restored = P.restore_iterator(make(), state)  # a fresh dataset object and iterator
    assert_batches_equal(expected, [next(restored) for _ in range(m)])


@pytest.mark.parametrize("n", [0, 1, 3])
def test_resume_pretrain(tok, texts, n):
    _check_resume(lambda: PP.pretrain_dataset(texts, tok, seq_len=SEQ, batch_size=3, seed=9),
                  n, 4)


def test_resume_pretrain_mixture(tok):
    _check_resume(lambda: PP.builtin_pretrain_dataset(tok, seq_len=64, batch_size=2, seed=4,
                                                     split="valid"), 5, 3)


def test_resume_sft_and_dpo(tok):
    convs = builtin_sft_conversations("valid")
    pairs = builtin_dpo_pairs("valid")
    _check_resume(lambda: CP.sft_dataset(convs, tok, seq_len=128, batch_size=2, seed=2), 3, 3)
    _check_resume(lambda: CP.dpo_dataset(pairs, tok, seq_len=96, batch_size=2, seed=2), 3, 3)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_set_state_accepts_json_round_trip_directly(tok, texts, prefetch):
    """Plain it.set_state(json.loads(...)) works too, including mid-document states."""
    ds = PP.pretrain_dataset(texts, tok, seq_len=SEQ, batch_size=1, seed=1, prefetch=prefetch)
    it = iter(ds)
    split_docs = 0
    for _ in range(12):
        state = it.get_state()
        split_docs += json.dumps(state).count("[-1, -1]") == 0  # a document cut mid-way
        expected = next(it)
        it2 = iter(ds)
        it2.set_state(json.loads(json.dumps(state)))
        assert_batches_equal([expected], [next(it2)])
    assert split_docs > 0


def test_generator_source(tok):
    docs = (d for d in builtin_documents("valid"))  # dicts with "text", consumed once
    batches = collect(PP.pretrain_dataset(docs, tok, seq_len=SEQ, batch_size=2, seed=0,
                                         num_epochs=1, drop_remainder=False, prefetch=0))
    assert sorted(docs_from_stream(batches, tok)) == encodings(
        tok, [d["text"] for d in builtin_documents("valid")])


# ----------------------------------------------------------------------------- sharding
def test_shards_are_disjoint_and_cover_the_epoch(tok, texts):
    def docs(i, epochs):
        ds = PP.pretrain_dataset(texts, tok, seq_len=SEQ, batch_size=2, seed=7, shard_index=i,
                                shard_count=2, num_epochs=epochs, drop_remainder=False)
        return docs_from_stream(collect(ds), tok)

    d0, d1 = docs(0, 1), docs(1, 1)
    assert d0 and d1 and not set(d0) & set(d1)
    assert sorted(d0 + d1) == encodings(tok, texts)
    two = collections.Counter(docs(0, 2) + docs(1, 2))
    assert set(two.values()) == {2} and sorted(two) == encodings(tok, texts)


# ----------------------------------------------------------------------------- mixture
GEB_WEIGHTS = {"c4": 33.1, "code": 14.7, "cc_zh": 28.4, "wudao": 8.9, "skypile": 14.9}


def test_mixture_proportions():
    sources = {k: [f"{k}|{i}" for i in range(50 + 17 * j)]
               for j, k in enumerate(GEB_WEIGHTS)}
    mix = P.mixture(sources, GEB_WEIGHTS, seed=0)
    total = sum(GEB_WEIGHTS.values())
    first = [mix[i] for i in range(5000)]
    counts = collections.Counter(s.split("|")[0] for s in first)
    for k, w in GEB_WEIGHTS.items():
        assert abs(counts[k] / 5000 - w / total) < 0.02, (k, counts[k])
    # every component is reshuffled per epoch, and the seed changes the order
    c4 = [s for s in first if s.startswith("c4|")]
    assert sorted(c4[:50]) == sorted(sources["c4"]) and c4[:50] != sources["c4"]
    assert c4[:50] != c4[50:100]
    other = P.mixture(sources, GEB_WEIGHTS, seed=1)
    assert [other[i] for i in range(200)] != first[:200]


def test_builtin_mixture_proportions_through_pipeline(tok):
    lang_of = {d["text"]: d["lang"] for d in builtin_documents("train")}
    mix = PP.builtin_mixture("train", seed=3)
    counts = collections.Counter(lang_of[mix[i]] for i in range(5000))
    for k, w in PP.builtin_mixture_weights.items():
        assert abs(counts[k] / 5000 - w / sum(PP.builtin_mixture_weights.values())) < 0.02
    # tokens by language after packing are close to the intended ~40/40/20 token shares
    enc = {tuple(tok.encode(t, add_bos=True, add_eos=True)): lang_of[t] for t in lang_of}
    batches = collect(PP.builtin_pretrain_dataset(tok, seq_len=512, batch_size=8, seed=3), n=40)
    docs = docs_from_stream(batches, tok)[1:-1]  # the ends may be partial documents
    share = collections.Counter()
    for d in docs:
        share[enc[d]] += len(d)
    tot = sum(share.values())
    assert abs(share["code"] / tot - 0.2) < 0.1 and abs(share["zh"] / tot - 0.4) < 0.1


def test_mixture_of_iter_datasets(tok):
    a = grain.MapDataset.source([f"a{i}" for i in range(30)]).repeat().to_iter_dataset()
    b = grain.MapDataset.source([f"b{i}" for i in range(30)]).repeat().to_iter_dataset()
    mix = P.mixture({"a": a, "b": b}, {"a": 3, "b": 1}, seed=0)
    assert isinstance(mix, grain.IterDataset)
    got = P.take(iter(mix), 400)
    assert abs(sum(s.startswith("a") for s in got) / 400 - 0.75) < 0.02
    ds = PP.pretrain_dataset(mix, tok, seq_len=SEQ, batch_size=2, seed=0)
    assert next(iter(ds))["inputs"].shape == (2, SEQ)


# ----------------------------------------------------------------------------- chat
CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2? 用中文回答。 (a literal <|end|> here)"},
    {"role": "assistant", "content": "2+2 等于 4。"},
    {"role": "user", "content": "And  3 × 3?\n"},
    {"role": "assistant", "content": "9, not <|assistant|> 8.\n  def f(): pass"},
]


def test_chat_mask_covers_exactly_the_assistant_replies(tok):
    ids, mask = encode_chat(tok, CONV)
    assert len(ids) == len(mask) and ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == render_chat(CONV)
    # role ids appear only as the template's own markers (message text cannot forge them)
    roles = [i for i in ids if i in tok.role_ids.values() and i != tok.end_id]
    assert len(roles) == len(CONV) and ids.count(tok.end_id) == len(CONV)
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    replies = [m["content"] for m in CONV if m["role"] == "assistant"]
    assert [tok.decode(r) for r in runs] == [r + "<|end|>" for r in replies]
    assert all(r[-1] == tok.end_id for r in runs)
    assert sum(mask) == sum(len(encode_reply(tok, r)) for r in replies)


def test_chat_prompt_and_render(tok):
    prompt = chat_prompt(tok, CONV[:2])
    assert prompt[-1] == tok.assistant_id
    assert prompt == encode_chat(tok, CONV[:2], add_eos=False)[0] + [tok.assistant_id]
    assert render_chat(CONV[:2], add_generation_prompt=True).endswith("<|end|><|assistant|>")
    assert tok.decode(prompt) == render_chat(CONV[:2], add_generation_prompt=True)


@pytest.mark.parametrize("msgs, pattern", [
    ([{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}], r"message 1 .*'bot'"),
    ([{"role": "user", "content": 3}], r"message 0 \(user\) content must be a str"),
    ([{"role": "user", "content": "hi"}, "hello"], r"message 1 must be a dict"),
    ([], r"no messages"),
])
def test_chat_errors_name_the_message(tok, msgs, pattern):
    with pytest.raises(ValueError, match=pattern):
        encode_chat(tok, msgs)
    with pytest.raises(ValueError, match=pattern):
        validate_messages(msgs)


# ----------------------------------------------------------------------------- SFT
def _segment_tokens(row, a, b, eos):
    toks = list(row["inputs"][a:b])
    if toks[-1] != eos and b == len(row["inputs"]):  # the segment runs into the last target
        toks.append(row["targets"][-1])
    return toks


def test_sft_rows_mask_only_assistant_targets(tok):
    convs = builtin_sft_conversations("valid")
    encoded = [encode_chat(tok, c["messages"]) for c in convs]
    stats = P.PipelineStats()
    seq = 160
    ds = CP.sft_dataset(convs, tok, seq_len=seq, batch_size=4, seed=1, num_epochs=1,
                       drop_remainder=False, stats=stats)
    seen, truncated = [], 0
    for row in rows(collect(ds)):
        mask, seg = row["loss_mask"], row["segment_ids"]
        assert np.all(mask[seg == 0] == 0) and np.all(row["inputs"][seg == 0] == tok.pad_id)
        for s, a, b in segments(row):
            np.testing.assert_array_equal(row["positions"][a:b], np.arange(b - a))
            toks = _segment_tokens(row, a, b, tok.eos_id)
            # the conversation this segment holds: all of it, or (truncated) its first seq+1
            match = [k for k, (ids, _) in enumerate(encoded) if ids[:len(toks)] == toks
                     and (len(ids) == len(toks) or len(toks) == seq + 1)]
            assert len(match) == 1
            k = match[0]
            ids, amask = encoded[k]
            truncated += len(ids) > len(toks)
            seen.append(k)
            # loss on t iff target t+1 is an assistant token of the same conversation (the
            # conversation's last token, eos, has no target in it: 0)
            expect = (list(amask[1:len(toks)]) + [0])[: b - a]
            np.testing.assert_array_equal(mask[a:b], np.array(expect, np.float32))
            if len(ids) == len(toks):  # the masked targets decode to the assistant replies
                replies = [m["content"] + "<|end|>" for m in convs[k]["messages"]
                           if m["role"] == "assistant"]
                assert tok.decode(row["targets"][a:b][mask[a:b] > 0]) == "".join(replies)
    assert sorted(seen) == list(range(len(convs)))  # each conversation exactly once
    n_long = sum(len(ids) > seq + 1 for ids, _ in encoded)
    assert stats["truncated"] == truncated == n_long > 0
    assert stats["conversations"] == len(convs)


# ----------------------------------------------------------------------------- DPO
def test_dpo_rows(tok):
    pairs = [{"prompt": f"Question {i}: " + "why? " * (i % 4),
              "chosen": f"Because {i} is good.", "rejected": f"No {i}{'!' * i}"}
             for i in range(12)]
    pairs.append({"prompt": [{"role": "system", "content": "sys"},
                             {"role": "user", "content": "long " * 60 + "Question 99: ok?"}],
                  "chosen": "Kept reply 99.", "rejected": "Other 99."})
    stats = P.PipelineStats()
    seq = 48
    batches = collect(CP.dpo_dataset(pairs, tok, seq_len=seq, batch_size=4, seed=0,
                                    num_epochs=1, drop_remainder=False, stats=stats))
    assert set(batches[0]) == {p + k for p in ("chosen_", "rejected_") for k in P.BATCH_KEYS}
    found = set()
    for c, r in zip(rows(batches, "chosen_"), rows(batches, "rejected_")):
        for row in (c, r):
            assert row["inputs"].shape == (seq,)
            np.testing.assert_array_equal(row["positions"], np.arange(seq))
            np.testing.assert_array_equal(row["segment_ids"],
                                          (row["inputs"] != tok.pad_id).astype(np.int32))
            np.testing.assert_array_equal(row["inputs"][1:], row["targets"][:-1])
        start = int(np.argmax(c["loss_mask"] > 0))  # target `start` is the first reply token
        assert start == int(np.argmax(r["loss_mask"] > 0))
        np.testing.assert_array_equal(c["inputs"][: start + 1], r["inputs"][: start + 1])
        assert c["inputs"][start] == tok.assistant_id and c["inputs"][0] == tok.bos_id
        q = re.search(r"Question (\d+)", tok.decode(c["inputs"][: start + 1])).group(1)
        pair = next(p for p in pairs if f"Question {q}:" in str(p["prompt"]))
        found.add(q)
        assert tok.decode(c["targets"][c["loss_mask"] > 0]) == pair["chosen"] + "<|end|>"
        assert tok.decode(r["targets"][r["loss_mask"] > 0]) == pair["rejected"] + "<|end|>"
        prompt = chat_prompt(tok, [{"role": "user", "content": pair["prompt"]}]
                             if isinstance(pair["prompt"], str) else pair["prompt"])
        if q != "99":
            assert list(c["inputs"][: start + 1]) == prompt
        else:  # left-truncated: bos, then the end of the prompt; the reply is kept whole
            kept = list(c["inputs"][: start + 1])
            assert len(kept) < len(prompt) and kept[1:] == prompt[len(prompt) - len(kept) + 1:]
    assert len(found) == len(pairs) and stats["prompt_truncated"] == 1


# ----------------------------------------------------------------------------- errors
def test_errors(tok, texts):
    for make in (PP.pretrain_dataset, CP.sft_dataset, CP.dpo_dataset):
        with pytest.raises(ValueError, match="seq_len"):
            make(["x"], tok, seq_len=1, batch_size=2, seed=0)
    with pytest.raises(ValueError, match="texts_source.*no text"):
        PP.pretrain_dataset(["", ""], tok, seq_len=SEQ, batch_size=2, seed=0)
    with pytest.raises(ValueError, match="'wiki'.*empty"):
        PP.pretrain_dataset([], tok, seq_len=SEQ, batch_size=2, seed=0, name="wiki")
    with pytest.raises(ValueError, match="'zh'.*no text"):
        P.mixture({"en": ["a"], "zh": [""]}, {"en": 1, "zh": 1}, seed=0)
    with pytest.raises(ValueError, match="same names"):
        P.mixture({"en": ["a"]}, {"zh": 1.0}, seed=0)
    with pytest.raises(ValueError, match="positive"):
        P.mixture({"en": ["a"]}, {"en": 0.0}, seed=0)
    with pytest.raises(ValueError, match=r"conversations_source\[1\]: message 0 .*'robot'"):
        CP.sft_dataset([CONV, [{"role": "robot", "content": "x"}]], tok, seq_len=SEQ,
                      batch_size=2, seed=0)
    with pytest.raises(ValueError, match=r"pairs_source\[0\] 'chosen' must be a str"):
        CP.dpo_dataset([{"prompt": "p", "chosen": None, "rejected": "r"}], tok, seq_len=SEQ,
                      batch_size=2, seed=0)
    with pytest.raises(ValueError, match="shard_index"):
        PP.pretrain_dataset(texts, tok, seq_len=SEQ, batch_size=2, seed=0, shard_index=2,
                           shard_count=2)


# ----------------------------------------------------------------------------- demo data
def test_builtin_demo_data():
    sft = {s: builtin_sft_conversations(s) for s in ("train", "valid")}
    dpo = {s: builtin_dpo_pairs(s) for s in ("train", "valid")}
    assert 300 <= len(sft["train"]) <= 1000 and 20 <= len(sft["valid"]) < len(sft["train"])
    assert 300 <= len(dpo["train"]) <= 1000 and 20 <= len(dpo["valid"]) < len(dpo["train"])
    assert sft == {s: builtin_sft_conversations(s) for s in ("train", "valid")}  # deterministic

    def first_user(msgs):
        return next(m["content"] for m in msgs if m["role"] == "user")

    assert not ({first_user(c["messages"]) for c in sft["train"]}
                & {first_user(c["messages"]) for c in sft["valid"]})
    tasks = collections.Counter(c["task"] for c in sft["train"])
    assert {"arithmetic", "continue", "poem", "source"} <= set(tasks)
    n_math = 0
    for c in sft["train"] + sft["valid"]:
        msgs = validate_messages(c["messages"])
        assert msgs[-1]["role"] == "assistant"
        for m in msgs:
            if c["task"] == "arithmetic" and m["role"] == "assistant":
                lhs, rhs = m["content"].split("=")
                assert eval(lhs.replace("×", "*")) == int(rhs)  # exact answers
                n_math += 1
    assert n_math > 50
    for p in dpo["train"] + dpo["valid"]:
        assert p["chosen"] != p["rejected"]
        if p["task"] == "arithmetic":
            lhs, rhs = p["chosen"].split("=")
            assert eval(lhs.replace("×", "*")) == int(rhs) != int(p["rejected"].split("=")[1])


# ----------------------------------------------------------------------------- losses
def test_batches_feed_the_losses(tok, texts):
    """The batches have the layouts geb_jax.train.losses expects (uniform logits: known loss)."""
    import jax.numpy as jnp

    from geb_jax.train import losses

    vocab = tok.vocab_size

    def apply(params, tokens, positions, segments):
        assert tokens.shape == positions.shape == segments.shape
        return jnp.zeros(tokens.shape + (vocab,), jnp.float32)

    pre = collect(PP.pretrain_dataset(texts, tok, seq_len=SEQ, batch_size=2, seed=0), n=1)[0]
    sft = collect(CP.sft_dataset(builtin_sft_conversations("valid"), tok, seq_len=128,
                                batch_size=2, seed=0), n=1)[0]
    dpo = collect(CP.dpo_dataset(builtin_dpo_pairs("valid"), tok, seq_len=96, batch_size=2,
                                seed=0), n=1)[0]
    for batch in (pre, sft):
        losses.check_batch_has_targets(batch)
        loss, metrics = losses.cross_entropy_loss(None, batch, apply)
        np.testing.assert_allclose(float(loss), np.log(vocab), rtol=1e-5)
        assert float(metrics["tokens"]) == batch["loss_mask"].sum()
    losses.check_batch_has_targets(dpo)
    loss, metrics = losses.dpo_loss(None, dpo, apply, reference_params={})
    np.testing.assert_allclose(float(loss), np.log(2.0), rtol=1e-5)
    assert float(metrics["pairs"]) == 2


# ----------------------------------------------------------------------------- shipped mixtures
def test_shipped_mixtures_sum_to_one_and_sampling_follows_weights(tmp_path):
    """configs/data_mixtures.py: weights sum to 1; the sampled sources pass a chi-square test."""
    import scipy.stats

    from configs.data_mixtures import geb_mixture, tinyllama_mixture
    from geb_jax.data import sources as S

    for entries in (geb_mixture(), tinyllama_mixture()):
        assert sum(e["weight"] for e in entries) == pytest.approx(1.0, abs=1e-12)
        assert all("<path to" in e["path"] for e in entries)  # placeholders until filled
    paths = {}
    for k, name in enumerate(("c4", "github_stackexchange", "chinese_commoncrawl", "wudao",
                              "skypile")):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": f"{name} document {i}"}) + "\n"
                                for i in range(7 + 3 * k)), encoding="utf-8")
        paths[name] = str(path)
    config = {"source": "mixture", "mixture": geb_mixture(**paths)}
    mix = S.documents_from_config(config, "train")  # hash split: ~95% of each file
    ds = P.mixture(mix.datasets, mix.weights, seed=0)
    n = 20_000
    counts = collections.Counter(ds[i]["text"].split(" document")[0] for i in range(n))
    names = list(mix.weights)
    expected = np.array([mix.weights[k] for k in names]) * n
    observed = np.array([counts[k] for k in names])
    chi2 = float(np.sum((observed - expected) ** 2 / expected))
    assert chi2 < scipy.stats.chi2.ppf(0.999, df=len(names) - 1), (observed, expected)
    with pytest.raises(ValueError, match="unknown mixture component"):
        geb_mixture(c5="x")
