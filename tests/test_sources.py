"""geb_jax.data.sources and geb_jax.data.tfds_builder: every way text gets into training.

Small files are written into tmp_path (txt, jsonl, jsonl.gz, parquet); each source must give
back exactly the documents written, in index order, with random access; errors must name the
file / line / column. The tfds builder is built offline into a tmp data_dir and read back with
tfds.data_source(download=False), without TensorFlow.
"""
import gzip
import json
import os
import pickle
import random
import sys

import grain
import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from geb_jax.config_base import base_config
from geb_jax.data import pipeline as P
from geb_jax.data import pretrain_pipeline as PP
from geb_jax.data import sources as S
from geb_jax.data import tfds_source as T
from geb_jax.data.corpus import builtin_documents
from geb_jax.data.tokenizer import builtin_tokenizer

SEQ = 32


def texts(prefix, n):
    """Distinct documents with Chinese, quotes, a tab and an embedded newline."""
    return [f"{prefix} {i}: 你好，世界 \"q\"\t" + "word " * (i % 7) + ("\nsecond line" if i % 3
                                                                   else "")
            for i in range(n)]


def write_jsonl(path, docs, field="text", gz=False, blank_lines=True):
    opener = gzip.open if gz else open
    with opener(path, "wt", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, field: d}, ensure_ascii=False) + "\n")
            if blank_lines and i == 1:
                f.write("\n")  # blank lines are not records
    return str(path)


def write_parquet(path, docs, field="text", row_group_size=3):
    table = pa.table({"id": list(range(len(docs))), field: docs})
    pq.write_table(table, path, row_group_size=row_group_size)
    return str(path)


def all_texts(ds):
    return [ds[i]["text"] for i in range(len(ds))]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return builtin_tokenizer(512, cache_dir=str(tmp_path_factory.mktemp("tok512")))


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """One folder with every format: {kind: (glob, documents in index order)}."""
    d = tmp_path_factory.mktemp("corpus")
    out = {}
    a, b = texts("jsonl-a", 7), texts("jsonl-b", 5)
    write_jsonl(d / "a.jsonl", a)
    write_jsonl(d / "b.jsonl", b)
    out["jsonl"] = (str(d / "*.jsonl"), a + b)
    g = texts("gz", 6)
    write_jsonl(d / "c.jsonl.gz", g, gz=True)
    out["jsonl.gz"] = (str(d / "*.jsonl.gz"), g)
    p = texts("parquet", 11)
    write_parquet(d / "d.parquet", p)
    out["parquet"] = (str(d / "*.parquet"), p)
    t = ["first file\n", "第二个文件：中文。", "third\n\nwith a blank line\n"]
    for i, x in enumerate(t):
        (d / f"t{i}.txt").write_text(x, encoding="utf-8")
    out["txt"] = (str(d / "t*.txt"), t)
    return out


# ----------------------------------------------------------------------------- local files
@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "parquet", "txt"])
def test_local_documents_exact_and_random_access(corpus_dir, kind):
    pattern, expected = corpus_dir[kind]
    ds = S.local_documents(pattern)
    assert isinstance(ds, grain.MapDataset)
    assert len(ds) == len(expected)
    assert all_texts(ds) == expected
    order = list(range(len(ds)))
    random.Random(0).shuffle(order)
    assert [ds[i]["text"] for i in order] == [expected[i] for i in order]
    assert set(ds[0]) == {"text", "source"}
    # Picklable (grain worker processes), reading the same after the round trip.
    again = pickle.loads(pickle.dumps(ds))
    assert [again[i]["text"] for i in order] == [expected[i] for i in order]


def test_local_sources_name_file_and_line(corpus_dir, tmp_path):
    jsonl = S.local_documents(corpus_dir["jsonl"][0])
    a = corpus_dir["jsonl"][0].replace("*", "a")
    assert jsonl[0]["source"] == f"{a}:1"
    assert jsonl[2]["source"] == f"{a}:4"  # line 3 is blank
    assert S.local_documents(corpus_dir["parquet"][0])[4]["source"].endswith("d.parquet:row 4")
    assert S.local_documents(corpus_dir["txt"][0])[1]["source"].endswith("t1.txt")


def test_mixed_glob_lang_tag_and_several_patterns(corpus_dir):
    pattern = os.path.join(os.path.dirname(corpus_dir["jsonl"][0]), "*.jsonl*")
    ds = S.local_documents(pattern, lang="zh")
    assert all_texts(ds) == corpus_dir["jsonl"][1] + corpus_dir["jsonl.gz"][1]
    assert all(ds[i]["lang"] == "zh" for i in range(len(ds)))
    both = S.local_documents([corpus_dir["parquet"][0], corpus_dir["txt"][0]])
    assert all_texts(both) == corpus_dir["parquet"][1] + corpus_dir["txt"][1]


def test_txt_paragraphs(tmp_path):
    (tmp_path / "a.txt").write_text(
        "\n\npara one\nline two\n\n  \n\tpara two 中文\n\n\n三\r\nlast line no newline",
        encoding="utf-8")
    (tmp_path / "b.txt").write_text("only one\n", encoding="utf-8")
    ds = S.local_documents(str(tmp_path / "*.txt"), txt_unit="paragraph")
    assert all_texts(ds) == ["para one\nline two", "\tpara two 中文",
                             "三\r\nlast line no newline", "only one"]
    assert ds[0]["source"] == f"{tmp_path / 'a.txt'}:3"
    assert ds[2]["source"] == f"{tmp_path / 'a.txt'}:10"
    assert ds[3]["text"] == "only one"


def test_custom_field(tmp_path):
    docs = texts("content", 4)
    write_jsonl(tmp_path / "x.jsonl", docs, field="content")
    write_parquet(tmp_path / "y.parquet", docs, field="content")
    assert all_texts(S.local_documents(str(tmp_path / "x.jsonl"), field="content")) == docs
    assert all_texts(S.local_documents(str(tmp_path / "y.parquet"), field="content")) == docs


# ----------------------------------------------------------------------------- local errors
def test_no_match_names_the_pattern(tmp_path):
    pattern = str(tmp_path / "nothing" / "*.jsonl")
    with pytest.raises(FileNotFoundError, match="nothing/\\*.jsonl"):
        S.local_documents(pattern)
    (tmp_path / "sub").mkdir()
    with pytest.raises(FileNotFoundError, match="only directories"):
        S.local_documents(str(tmp_path / "sub"))


def test_bad_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": "broken"\n', encoding="utf-8")
    with pytest.raises(S.SourceError, match=r"bad\.jsonl:3: not valid JSON"):
        S.local_documents(str(path), bad_records="error")
    lazy = S.local_documents(str(path), validate=False)  # only indexed: found when read
    assert len(lazy) == 2 and lazy[0]["text"] == "ok"
    doc = lazy[1]  # counted once per read
    assert doc["text"] == "" and doc["source"].endswith("bad.jsonl:3")  # skipped
    assert S.local_source(lazy).skipped.counts == {"invalid JSON": 1}
    with pytest.raises(S.SourceError, match=r"bad\.jsonl:3: not valid JSON"):
        S.local_documents(str(path), validate=False, bad_records="error")[1]


def test_missing_or_non_string_field_names_file_and_line(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_text('{"text": "a"}\n{"body": "b", "id": 2}\n', encoding="utf-8")
    with pytest.raises(S.SourceError, match=r"f\.jsonl:2: .*no field 'text'.*'body', 'id'"):
        S.local_documents(str(path), bad_records="error")
    gz = tmp_path / "g.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write('{"text": "a"}\n{"text": 3}\n')
    with pytest.raises(S.SourceError, match=r"g\.jsonl\.gz:2: field 'text' is a int"):
        S.local_documents(str(gz), bad_records="error")
    arr = tmp_path / "h.jsonl"
    arr.write_text('["text"]\n', encoding="utf-8")
    with pytest.raises(S.SourceError, match=r"h\.jsonl:1: expected a JSON object"):
        S.local_documents(str(arr), bad_records="error")


def test_parquet_without_column_lists_columns(tmp_path):
    path = write_parquet(tmp_path / "p.parquet", ["a", "b"], field="body")
    with pytest.raises(S.SourceError, match=r"p\.parquet: .*no column 'text'.*'id', 'body'"):
        S.local_documents(path, bad_records="error")
    with pytest.raises(S.SourceError, match=r"column 'id' has type int64"):
        S.local_documents(path, field="id", bad_records="error")
    nulls = tmp_path / "n.parquet"
    pq.write_table(pa.table({"text": ["a", None]}), nulls)
    with pytest.raises(S.SourceError, match=r"n\.parquet:row 1: column 'text' is null"):
        S.local_documents(str(nulls), bad_records="error")


def test_other_local_errors(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(S.SourceError, match=r"x\.csv: unsupported file type"):
        S.local_documents(str(tmp_path / "*.csv"))
    (tmp_path / "bin.txt").write_bytes(b"ok \xff\xfe")
    with pytest.raises(S.SourceError, match=r"bin\.txt: not valid UTF-8"):
        S.local_documents(str(tmp_path / "bin.txt"), bad_records="error")
    with pytest.raises(S.SourceError, match="txt_unit"):
        S.local_documents(str(tmp_path / "bin.txt"), txt_unit="line")
    with pytest.raises(S.SourceError, match="bad_records"):
        S.local_documents(str(tmp_path / "bin.txt"), bad_records="ignore")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(S.SourceError, match=r"nothing usable.*empty\.jsonl.*1 empty file"):
        S.local_documents(str(tmp_path / "empty.jsonl"))


# ----------------------------------------------------------------------------- bad input
BIG_LINE_BYTES = 50 * 2**20


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory):
    """One good and one bad example of every kind the issue lists, in one folder."""
    d = tmp_path_factory.mktemp("bad")
    (d / "a_empty.txt").write_bytes(b"")
    (d / "b_empty.jsonl").write_bytes(b"")
    (d / "c_utf8.txt").write_bytes(b"caf\xe9 au lait")  # Latin-1, not UTF-8
    (d / "d_good.txt").write_text("a good text file", encoding="utf-8")
    with open(d / "e_mixed.jsonl", "wb") as f:
        f.write(b'{"text": "good one"}\n')
        f.write(b'{"body": "no text field"}\n')
        f.write(b'{"text": 42}\n')
        f.write(b'{"text": ["a", "list"]}\n')
        f.write(b'{"text": "bad \xff utf8"}\n')
        f.write(b'{"text": "' + b"x" * BIG_LINE_BYTES + b'"}\n')  # a 50 MB single line
        f.write(b'not json at all\n')
        f.write(b'{"text": "good two"}\n')
    pq.write_table(pa.table({"text": [1, 2, 3]}), d / "f_int_column.parquet")
    pq.write_table(pa.table({"text": ["p1", None, "p2"]}), d / "g_nulls.parquet")
    (d / "h_big.txt").write_bytes(b"y" * BIG_LINE_BYTES)  # a 50 MB single line, one file
    return d


EXPECTED_SKIPS = {"empty file": 2, "invalid UTF-8": 2, "text field missing": 1,
                  "text field not a string": 2, "record too large": 2, "invalid JSON": 1,
                  "Parquet column not text": 1, "text value null": 1}


def test_bad_input_is_skipped_and_counted(bad_dir):
    ds = S.local_documents(str(bad_dir / "*"), max_record_bytes=2**20)
    assert [d["text"] for d in ds] == ["a good text file", "good one", "good two", "p1", "p2"]
    skipped = S.local_source(ds).skipped
    assert dict(skipped.counts) == EXPECTED_SKIPS
    assert skipped.total == sum(EXPECTED_SKIPS.values())
    assert any("e_mixed.jsonl:2" in e for e in skipped.examples)  # examples name file + line


def test_bad_input_unvalidated_never_crashes_mid_run(bad_dir, tok):
    """validate=False: bad records surface only when read, as empty (skipped) documents."""
    ds = S.local_documents(str(bad_dir / "*.jsonl"), validate=False, max_record_bytes=2**20)
    assert len(ds) == 7  # 9 lines but the 50 MB one (its size is known when indexing);
    # the other bad lines are only found when read
    texts = [d["text"] for d in ds]
    assert texts == ["good one", "", "", "", "", "", "good two"]
    skipped = S.local_source(ds).skipped
    assert skipped.counts["record too large"] == 1 and skipped.counts["invalid JSON"] == 1
    batches = list(PP.pretrain_dataset(ds, tok, seq_len=8, batch_size=1, seed=0, num_epochs=1,
                                      drop_remainder=False, prefetch=0))
    rows = [np.concatenate([b["inputs"][0], b["targets"][0, -1:]]) for b in batches]
    assert tok.decode(np.concatenate(rows)) in ("good onegood two", "good twogood one")


def test_source_with_nothing_usable_is_one_clear_error(tmp_path):
    bad = tmp_path / "all_bad.jsonl"
    bad.write_text('{"body": "x"}\n{"body": "y"}\n', encoding="utf-8")
    with pytest.raises(S.SourceError, match=r"nothing usable.*all_bad\.jsonl.*2 text field "
                                            r"missing.*data\.field='text'"):
        S.local_documents(str(bad))
    pq.write_table(pa.table({"text": [1.5]}), tmp_path / "num.parquet")
    with pytest.raises(S.SourceError, match=r"num\.parquet.*Parquet column not text"):
        S.local_documents(str(tmp_path / "num.parquet"))


def test_bad_input_config_fields(bad_dir):
    cfg = data_config(source="local", path=str(bad_dir / "e_*.jsonl"), valid_fraction=0.0,
                      max_record_bytes=2**20)
    assert [d["text"] for d in S.documents_from_config(cfg, "train")] == ["good one",
                                                                           "good two"]
    cfg.bad_records = "error"
    with pytest.raises(S.SourceError, match=r"e_mixed\.jsonl:2"):
        S.documents_from_config(cfg, "train")


# ----------------------------------------------------------------------------- tfds
@pytest.fixture(scope="module")
def tfds_built(tmp_path_factory):
    """A geb_local_text dataset built from a JSONL glob (plus a .jsonl.gz) into a data_dir."""
    from geb_jax.data import tfds_builder

    tf_before = "tensorflow" in sys.modules
    d = tmp_path_factory.mktemp("tfds_src")
    docs = texts("tfds-a", 30) + texts("tfds-b", 20)
    write_jsonl(d / "a.jsonl", docs[:30])
    write_jsonl(d / "b.jsonl.gz", docs[30:], gz=True)
    data_dir = str(tmp_path_factory.mktemp("tfds_data"))
    pattern = str(d / "*.jsonl*")
    name = tfds_builder.build_local_tfds(pattern, data_dir, valid_fraction=0.3)
    return dict(name=name, data_dir=data_dir, pattern=pattern, docs=docs, builder=tfds_builder,
                tf_before=tf_before)


def test_tfds_builder_roundtrip_offline(tfds_built, monkeypatch):
    import tensorflow_datasets as tfds

    calls = []
    real = tfds.data_source

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(tfds, "data_source", spy)
    name, data_dir, docs = tfds_built["name"], tfds_built["data_dir"], tfds_built["docs"]
    assert name == "geb_local_text"
    train = T.tfds_documents(name, data_dir=data_dir, split="train")
    valid = T.tfds_documents(name, data_dir=data_dir, split="validation")
    assert calls and all(c["download"] is False for c in calls)
    assert isinstance(train, grain.MapDataset) and len(train) + len(valid) == len(docs)
    tr, va = all_texts(train), all_texts(valid)
    assert sorted(tr + va) == sorted(docs)  # the union is the input, nothing twice
    # The split is the deterministic hash split (the same as the "local" source's).
    assert {S.split_of(t, 0.3) for t in tr} == {"train"}
    assert {S.split_of(t, 0.3) for t in va} == {"valid"}
    local = S.LocalSource(tfds_built["pattern"])
    idx = S.hash_split_indices(local, 0.3)
    assert sorted(tr) == sorted(local[int(i)]["text"] for i in idx["train"])
    # Random access; decoded str; the source feature says where each document came from.
    assert train[3] == train[3] and isinstance(train[3]["text"], str)
    assert train[3]["source"].split(":")[0].endswith(("a.jsonl", "b.jsonl.gz"))
    if not tfds_built["tf_before"]:
        assert "tensorflow" not in sys.modules  # built and read without TensorFlow


def test_tfds_builder_is_deterministic_reused_and_guarded(tfds_built, tmp_path):
    b = tfds_built["builder"]
    other = str(tmp_path / "again")
    assert b.build_local_tfds(tfds_built["pattern"], other, valid_fraction=0.3) == b.NAME
    first = all_texts(T.tfds_documents(b.NAME, data_dir=tfds_built["data_dir"], split="train"))
    second = all_texts(T.tfds_documents(b.NAME, data_dir=other, split="train"))
    assert first == second  # same order in every build
    # Same inputs: reused. Other inputs: refused unless overwrite=True.
    assert b.build_local_tfds(tfds_built["pattern"], other, valid_fraction=0.3) == b.NAME
    with pytest.raises(FileExistsError, match="overwrite=True"):
        b.build_local_tfds(tfds_built["pattern"], other, valid_fraction=0.5)
    b.build_local_tfds(tfds_built["pattern"], other, valid_fraction=0.5, overwrite=True)
    half = T.tfds_documents(b.NAME, data_dir=other, split="validation")
    assert {S.split_of(t, 0.5) for t in all_texts(half)} == {"valid"}
    # A named config: several datasets in one data_dir.
    name = b.build_local_tfds(tfds_built["pattern"], other, valid_fraction=0.3, config="mine")
    assert name == "geb_local_text/mine"
    assert sorted(all_texts(T.tfds_documents(name, data_dir=other, split="train"))) == \
        sorted(first)


def test_tfds_builder_reads_parquet_and_txt(corpus_dir, tmp_path):
    from geb_jax.data.tfds_builder import build_local_tfds

    name = build_local_tfds([corpus_dir["parquet"][0], corpus_dir["txt"][0]], str(tmp_path),
                            valid_fraction=0.0)
    ds = T.tfds_documents(name, data_dir=str(tmp_path), split="train")
    assert sorted(all_texts(ds)) == sorted(corpus_dir["parquet"][1] + corpus_dir["txt"][1])
    with pytest.raises(S.SourceError, match="no split 'validation'.*'train'"):
        T.tfds_documents(name, data_dir=str(tmp_path), split="validation")


def test_tfds_missing_dataset_clear_error(tfds_built, tmp_path):
    empty = str(tmp_path / "empty")
    with pytest.raises(FileNotFoundError) as e:
        T.tfds_documents("geb_local_text", data_dir=empty, split="train")
    msg = str(e.value)
    assert "'geb_local_text'" in msg and empty in msg and "never downloads" in msg
    assert "build_local_tfds" in msg
    with pytest.raises(FileNotFoundError, match="'c4/en:3.1.0'"):
        T.tfds_documents("c4/en:3.1.0", data_dir=tfds_built["data_dir"], split="train")
    assert not os.path.exists(empty)  # nothing was created, nothing downloaded
    with pytest.raises(S.SourceError, match="no feature 'body'.*'source', 'text'"):
        T.tfds_documents("geb_local_text", data_dir=tfds_built["data_dir"], split="train",
                         field="body")
    with pytest.raises(S.SourceError, match="no split 'test'"):
        T.tfds_documents("geb_local_text", data_dir=tfds_built["data_dir"], split="test")


# ----------------------------------------------------------------------------- config
def data_config(**fields):
    """config_base's data section plus the source fields (defaults from DATA_DEFAULTS)."""
    c = base_config().data
    for k, v in S.DATA_DEFAULTS.items():
        if k not in c:
            c[k] = list(v) if isinstance(v, tuple) else v
    c.update(fields)
    return c


def test_config_builtin():
    train = S.documents_from_config(data_config(), "train")
    assert all_texts(train) == [d["text"] for d in builtin_documents("train")]
    zh = S.documents_from_config(data_config(lang="zh"), "valid")
    assert len(zh) > 0 and {zh[i]["lang"] for i in range(len(zh))} == {"zh"}


def test_config_local_hash_split_and_valid_path(corpus_dir):
    pattern, docs = corpus_dir["parquet"]
    cfg = data_config(source="local", path=pattern, valid_fraction=0.4)
    train = all_texts(S.documents_from_config(cfg, "train"))
    valid = all_texts(S.documents_from_config(cfg, "valid"))
    assert train and valid and sorted(train + valid) == sorted(docs)
    assert train == [t for t in docs if t in train]  # index order kept
    assert {S.split_of(t, 0.4) for t in valid} == {"valid"}
    cfg = data_config(source="local", path=pattern, valid_path=corpus_dir["jsonl"][0])
    assert all_texts(S.documents_from_config(cfg, "train")) == docs
    assert all_texts(S.documents_from_config(cfg, "valid")) == corpus_dir["jsonl"][1]
    cfg = data_config(source="local", path=pattern, valid_fraction=0.0)
    assert all_texts(S.documents_from_config(cfg, "train")) == docs
    with pytest.raises(S.SourceError, match="no validation documents"):
        S.documents_from_config(cfg, "valid")
    with pytest.raises(S.SourceError, match="data.path is empty"):
        S.documents_from_config(data_config(source="local"), "train")


def test_config_tfds(tfds_built):
    cfg = data_config(source="tfds", tfds_name=tfds_built["name"],
                      tfds_data_dir=tfds_built["data_dir"])
    train, valid = (all_texts(S.documents_from_config(cfg, s)) for s in ("train", "valid"))
    assert sorted(train + valid) == sorted(tfds_built["docs"])
    assert {S.split_of(t, 0.3) for t in valid} == {"valid"}


def test_config_mixture_and_errors(corpus_dir, tfds_built):
    cfg = data_config(source="mixture", mixture=[
        {"source": "local", "path": corpus_dir["jsonl"][0], "valid_fraction": 0.0,
         "weight": 3.0, "name": "mine", "lang": "en"},
        {"source": "builtin", "lang": "zh", "weight": 1},
        {"source": "tfds", "tfds_name": tfds_built["name"],
         "tfds_data_dir": tfds_built["data_dir"], "weight": 0.5}])
    mix = S.documents_from_config(cfg, "train")
    assert isinstance(mix, S.Mixture)
    assert mix.weights == {"mine": 3.0, "1_builtin": 1.0, "2_tfds": 0.5}
    assert all_texts(mix.datasets["mine"]) == corpus_dir["jsonl"][1]
    assert mix.datasets["mine"][0]["lang"] == "en"
    mixed = P.mixture(mix.datasets, mix.weights, seed=0)
    assert mixed[0]["text"]
    source = S.texts_source_from_config(cfg, "train", seed=0)
    assert [source[i]["text"] for i in range(20)] == [mixed[i]["text"] for i in range(20)]
    # Entries from an ml_collections round trip (a ConfigDict) work the same.
    again = ml_collections.ConfigDict(cfg.to_dict())
    assert S.documents_from_config(again, "train").weights == mix.weights

    with pytest.raises(S.SourceError, match=r"unknown data.source 'hf'.*'builtin', 'local', "
                                            r"'tfds', 'pretokenized', 'mixture'"):
        S.documents_from_config(data_config(source="hf"), "train")
    with pytest.raises(S.SourceError, match=r"mixture\[0\] has unknown key.*'pth'"):
        S.documents_from_config(data_config(source="mixture", mixture=[
            {"source": "local", "pth": "x", "weight": 1}]), "train")
    with pytest.raises(S.SourceError, match=r"mixture\[0\] needs a positive 'weight'"):
        S.documents_from_config(data_config(source="mixture", mixture=[
            {"source": "builtin"}]), "train")
    with pytest.raises(S.SourceError, match=r"unknown data.mixture\[0\].source 'web'"):
        S.documents_from_config(data_config(source="mixture", mixture=[
            {"source": "web", "weight": 1}]), "train")
    with pytest.raises(S.SourceError, match="data.mixture is empty"):
        S.documents_from_config(data_config(source="mixture"), "train")
    with pytest.raises(S.SourceError, match="unknown split 'test'"):
        S.documents_from_config(data_config(), "test")


def test_config_without_new_fields_uses_defaults():
    """A config that predates these fields (only source) still works: defaults fill in."""
    c = ml_collections.ConfigDict(dict(source="builtin"))
    assert len(S.documents_from_config(c, "valid")) == len(list(builtin_documents("valid")))


# ----------------------------------------------------------------------------- end to end
def test_pretrain_dataset_accepts_every_source(corpus_dir, tfds_built, tok):
    datasets = {kind: S.local_documents(pattern) for kind, (pattern, _) in corpus_dir.items()}
    datasets["paragraphs"] = S.local_documents(corpus_dir["txt"][0], txt_unit="paragraph")
    datasets["tfds"] = T.tfds_documents(tfds_built["name"], data_dir=tfds_built["data_dir"],
                                        split="train")
    datasets["builtin"] = S.documents_from_config(data_config(), "valid")
    datasets["local_split"] = S.documents_from_config(
        data_config(source="local", path=corpus_dir["jsonl"][0], valid_fraction=0.3), "train")
    datasets["mixture"] = S.texts_source_from_config(data_config(
        source="mixture", mixture=[{"source": "local", "path": corpus_dir["parquet"][0],
                                    "valid_fraction": 0.0, "weight": 1.0},
                                   {"source": "builtin", "weight": 1.0}]), "train", seed=0)
    for name, ds in datasets.items():
        batches = PP.pretrain_dataset(ds, tok, seq_len=SEQ, batch_size=2, seed=0,
                                     read_threads=1, prefetch=0, name=name)
        batch = next(iter(batches))
        assert set(batch) == set(P.BATCH_KEYS), name
        assert all(np.asarray(v).shape == (2, SEQ) for v in batch.values()), name
        assert np.asarray(batch["loss_mask"]).sum() > 0, name
