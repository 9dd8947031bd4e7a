"""One flag style per CLI family (docs/architecture.md, "Command-line flags").

argparse commands (geb_jax.infer, eval, data.prepare, data.pretokenize, data.tokenizer,
infer.bench) spell long options with dashes, like pip and llama.cpp; absl commands (geb_jax.main,
geb_jax.sweep) use absl's underscores beside ml-collections' `--config.section.field`. A mixed
spelling is an error users only meet at run time, so the sources are checked here.
"""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "geb_jax").rglob("*.py"))


def _calls(path: pathlib.Path, names: set[str]):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in names:
                yield node


def _string_args(call: ast.Call) -> list[str]:
    return [a.value for a in call.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]


def test_argparse_long_options_use_dashes():
    bad = []
    for path in SOURCES:
        for call in _calls(path, {"add_argument"}):
            for flag in _string_args(call):
                if flag.startswith("--") and "_" in flag:
                    bad.append(f"{path.relative_to(ROOT)}:{call.lineno} {flag}")
    assert not bad, "argparse flags must use dashes:\n" + "\n".join(bad)


def test_absl_flags_use_underscores():
    defines = {f"DEFINE_{k}" for k in ("string", "integer", "float", "bool", "boolean", "enum",
                                        "list", "multi_string")}
    names, bad = [], []
    for path in SOURCES:
        for call in _calls(path, defines):
            flag = _string_args(call)[0]
            names.append(flag)
            if "-" in flag:
                bad.append(f"{path.relative_to(ROOT)}:{call.lineno} {flag}")
    assert names, "found no absl flag definitions: the scan is broken"
    assert not bad, "absl flags must use underscores:\n" + "\n".join(bad)


@pytest.mark.parametrize("flag, ok", [("--max-tokens", True), ("--max_tokens", False)])
def test_the_scan_sees_a_mixed_spelling(tmp_path, flag, ok):
    """The argparse check flags an underscore spelling (it would otherwise pass vacuously)."""
    src = tmp_path / "cli.py"
    src.write_text(f"import argparse\np = argparse.ArgumentParser()\np.add_argument({flag!r})\n")
    found = [f for c in _calls(src, {"add_argument"}) for f in _string_args(c)
             if f.startswith("--") and "_" in f]
    assert (not found) == ok
