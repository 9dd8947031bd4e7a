"""Pre-tokenized corpora (geb_jax/data/pretokenize.py): the same batches as tokenizing on the fly.

The built-in corpus is written to array_record once per module with a small tokenizer; the
packed batches read back must equal, array for array, those of the on-the-fly pipeline with
the same seed (single source, mixture, after a resume), the manifest's counts must equal the
tokenizer's own encoding, and a different tokenizer must be refused.
"""
import json
import os
import numpy as np
import pytest

from geb_jax.config_base import base_config
from geb_jax.data import pipeline as P
from geb_jax.data import pretokenize as PT
from geb_jax.data import pretokenized as PR
from geb_jax.data import pretrain_pipeline as PP
from geb_jax.data import sources as S
from geb_jax.data.corpus import builtin_texts
from geb_jax.data.tokenizer import builtin_tokenizer
from tests.conftest import REPO_ROOT

SEQ, BATCH, N_BATCHES = 48, 4, 25


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tok_cache"))


@pytest.fixture(scope="module")
def tok(cache_dir):
    return builtin_tokenizer(512, cache_dir=cache_dir)


def config_for(**data):
    c = base_config()
    c.model.vocab_size = 512
    c.data.update(data)
    return c


@pytest.fixture(scope="module")
def written(tmp_path_factory, tok):
    """{name: folder}: the whole built-in corpus, and its en and zh parts separately."""
    root = tmp_path_factory.mktemp("pretok")
    out = {}
    for name, lang in (("all", ""), ("en", "en"), ("zh", "zh")):
        out[name] = str(root / name)
        PT.pretokenize(config_for(lang=lang), out[name], progress=False, tokenizer=tok)
    return out


def batches(source, tok, n=N_BATCHES, seed=3, state=None):
    ds = PP.pretrain_dataset(source, tok, seq_len=SEQ, batch_size=BATCH, seed=seed)
    it = P.restore_iterator(ds, state) if state is not None else iter(ds)
    return P.take(it, n), it


def assert_same(a, b):
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_manifest_counts_equal_the_tokenizer(written, tok):
    manifest = PR.read_manifest(written["all"])
    assert manifest["tokenizer"]["vocab_size"] == tok.vocab_size == 512
    for split in ("train", "valid"):
        texts = list(builtin_texts(split))
        entry = manifest["splits"][split]
        assert entry["documents"] == len(texts)
        assert entry["tokens"] == sum(len(tok.encode(t)) + 2 for t in texts if t)
        docs = PR.pretokenized_documents(written["all"], split, tok)
        for i in (0, len(texts) // 2, len(texts) - 1):  # random access, exact ids
            assert docs[i]["tokens"].tolist() == tok.encode(texts[i], add_bos=True,
                                                            add_eos=True)


def test_same_batches_as_on_the_fly(written, tok):
    fly = S.texts_source_from_config(config_for().data, "train", seed=0)
    pre = S.texts_source_from_config(config_for(source="pretokenized", path=written["all"]).data,
                                     "train", seed=0, tokenizer=tok)
    expected, it = batches(fly, tok)
    got, it_pre = batches(pre, tok)
    assert_same(got, expected)
    # resume: the iterator state of one path continues the other path's stream exactly
    more_fly, _ = batches(fly, tok, n=5, state=P.iterator_state(it))
    more_pre, _ = batches(pre, tok, n=5, state=P.iterator_state(it_pre))
    assert_same(more_pre, more_fly)


def test_same_batches_for_a_mixture(written, tok):
    def mixture(kind):
        entries = [dict(name=lang, weight=w, source=kind, lang=lang,
                        path=written[lang] if kind == "pretokenized" else "")
                   for lang, w in (("en", 0.6), ("zh", 0.4))]
        return config_for(source="mixture", mixture=entries).data

    fly = S.texts_source_from_config(mixture("builtin"), "train", seed=5)
    pre = S.texts_source_from_config(mixture("pretokenized"), "train", seed=5, tokenizer=tok)
    assert_same(batches(pre, tok, seed=5)[0], batches(fly, tok, seed=5)[0])


def test_other_tokenizer_is_refused(written, tok, cache_dir):
    other = builtin_tokenizer(640, cache_dir=cache_dir)
    with pytest.raises(PR.PretokenizedError, match=r"tokenized by another tokenizer.*vocab 512"
                                                   r".*vocab 640.*Pre-tokenize again"):
        S.texts_source_from_config(config_for(source="pretokenized", path=written["all"]).data,
                                   "train", seed=0, tokenizer=other)
    with pytest.raises(S.SourceError, match="pass the run's tokenizer"):
        S.texts_source_from_config(config_for(source="pretokenized", path=written["all"]).data,
                                   "train", seed=0)


def test_folder_errors(written, tok, tmp_path):
    with pytest.raises(PR.PretokenizedError, match=r"not a pre-tokenized folder.*--out"):
        PR.pretokenized_documents(str(tmp_path), "train", tok)
    manifest = PR.read_manifest(written["all"])
    del manifest["splits"]["valid"]
    (tmp_path / PR.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(PR.PretokenizedError, match=r"no 'valid' split.*--splits train,valid"):
        PR.pretokenized_documents(str(tmp_path), "valid", tok)
    with pytest.raises(PR.PretokenizedError, match="shard"):
        PR.pretokenized_documents(str(tmp_path), "train", tok)  # shards not copied here
    with pytest.raises(PR.PretokenizedError, match="mixture entry"):
        PT.pretokenize(config_for(source="mixture"), str(tmp_path / "x"), tokenizer=tok)


def test_cli_shards_atomically(tmp_path, cache_dir, tok, monkeypatch, capsys):
    docs = tmp_path / "docs.jsonl"
    texts = [f"document {i}: " + "some words here " * (i % 7) for i in range(300)] + [""]
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    out = tmp_path / "out"
    monkeypatch.setenv("GEB_JAX_CACHE", cache_dir)
    monkeypatch.chdir(REPO_ROOT)
    code = PT.main(["--config", "configs/tiny.py", "--out", str(out), "--splits", "train",
                    "--shard-mb", "0.005", "--no-progress", "--config.model.vocab_size=512",
                    "--config.data.source=local", f"--config.data.path={docs}",
                    "--config.data.valid_fraction=0.0"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "301 documents" in printed.out
    assert sorted(os.listdir(tmp_path)) == ["docs.jsonl", "out"]  # no temporary folder left
    manifest = PR.read_manifest(str(out))
    shards = manifest["splits"]["train"]["shards"]
    assert len(shards) > 1 and sum(s["documents"] for s in shards) == 301
    assert manifest["splits"]["train"]["empty"] == 1
    docs_back = PR.pretokenized_documents(str(out), "train", tok)
    assert [d["tokens"].tolist() for d in docs_back] == [
        tok.encode(t, add_bos=True, add_eos=True) if t else [] for t in texts]
    code = PT.main(["--config", "configs/tiny.py", "--out", str(tmp_path / "o2"),
                    "--config.data.source=local", f"--config.data.path={tmp_path / 'no*.jsonl'}"])
    assert code == 2 and "no*.jsonl" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()
