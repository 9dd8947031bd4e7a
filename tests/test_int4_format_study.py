"""experiments/int4_format_study.py: the variants it builds are the formats it names (the
exporter's quantizer swapped only inside the study), and its command line runs in a fresh
process on a preset model."""
import json
import os
import subprocess
import sys

import numpy as np
import onnx

from tests.conftest import REPO_ROOT, load_experiment


def _nbits(path):
    model = onnx.load(path, load_external_data=False)
    return [(n, {a.name: a.i for a in n.attribute}) for n in model.graph.node
            if n.op_type == "MatMulNBits"]


def test_variants_build_the_named_formats_and_leave_the_exporter_alone(tmp_path):
    study = load_experiment("int4_format_study")
    config, state, windows = study.load("tiny", 0, 8, 2, want_ppl=False)
    assert windows == []
    paths = {}
    for text in ("b=32,sym=0,hb=4", "b=32"):
        paths[text] = str(tmp_path / f"{text.replace(',', '_')}.onnx")
        study.build(config, state, study.parse_variant(text), paths[text])
    asym = {n.name: (len(n.input), a["bits"]) for n, a in _nbits(paths["b=32,sym=0,hb=4"])}
    sym = {n.name: (len(n.input), a["bits"]) for n, a in _nbits(paths["b=32"])}
    assert asym.pop("/lm_head/MatMulNBits") == (4, 4)  # the old format: an asymmetric head
    assert sym.pop("/lm_head/MatMulNBits") == (3, 8)
    assert set(asym.values()) == {(4, 4)} and set(sym.values()) == {(3, 4)}  # zero points
    # after the study's build the exporter writes its own format again
    from geb_jax.export.onnx_graph import HEAD_BITS, Quant
    assert Quant(4, 128).for_head(64).bits == HEAD_BITS
    study.build(config, state, {}, str(tmp_path / "default.onnx"))
    assert {len(n.input) for n, _ in _nbits(str(tmp_path / "default.onnx"))} == {3}


def test_command_line_in_a_fresh_process():
    result = subprocess.run(
        [sys.executable, os.path.join("experiments", "int4_format_study.py"), "--model", "tiny",
         "--ppl", "0", "--reps", "1", "--prompt", "8", "--decode", "2",
         "--variants", "b=32,sym=0;b=32"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["variant"] for r in rows] == ["b=32,sym=0", "b=32"]
    # the zero points are the only difference: more bytes per token for the asymmetric file
    assert rows[0]["MiB_per_token"] > rows[1]["MiB_per_token"]
    assert all(np.isfinite(r["decode_tok_s"]) and r["decode_tok_s"] > 0 for r in rows)
    bad = subprocess.run(
        [sys.executable, os.path.join("experiments", "int4_format_study.py"), "--model", "tiny",
         "--variants", "blocks=32"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "unknown keys ['blocks']" in bad.stderr
