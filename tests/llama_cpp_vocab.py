"""llama.cpp's tokenizer test vocabularies, fetched once into a cache folder.

llama.cpp ships models/ggml-vocab-<name>.gguf (vocabulary-only GGUFs of published models) with
<name>.gguf.inp (test texts, separated by "\\n__ggml_vocab_test__\\n") and <name>.gguf.out
(llama.cpp's ids for each text, one line per text). They are inside the llama-cpp-python sdist
(vendor/llama.cpp/models/), so `vocab_dir()` gets that sdist with pip - for the installed
llama_cpp version, else DEFAULT_VERSION - and extracts only those files:

    <cache>/llama_cpp_vocab/llama-cpp-python-<version>/ggml-vocab-*.gguf{,.inp,.out}

<cache> is $GEB_JAX_CACHE, else $XDG_CACHE_HOME/geb_jax, else ~/.cache/geb_jax. An sdist
already in <cache>/llama_cpp_vocab/ (or named by $GEB_JAX_LLAMA_CPP_SDIST) is used instead of
downloading. The extraction goes to a temporary folder renamed into place, so a crash or a
parallel test run never leaves a half-filled cache.
"""
from __future__ import annotations

import fnmatch
import glob
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

DEFAULT_VERSION = "0.3.36"
SEPARATOR = "\n__ggml_vocab_test__\n"
_MEMBERS = "*/vendor/llama.cpp/models/ggml-vocab-*"


def llama_cpp_version() -> str:
    """The installed llama-cpp-python's version (read without importing it), or the default."""
    try:
        return importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        return DEFAULT_VERSION


def cache_root() -> str:
    from geb_jax.data.tokenizer import default_cache_dir

    return os.path.join(default_cache_dir(), "llama_cpp_vocab")


def vocab_dir(version: str | None = None) -> str:
    """The folder holding ggml-vocab-* files, fetching and extracting them if needed."""
    version = version or llama_cpp_version()
    root = cache_root()
    target = os.path.join(root, f"llama-cpp-python-{version}")
    if glob.glob(os.path.join(target, "ggml-vocab-*.gguf")):
        return target
    os.makedirs(root, exist_ok=True)
    local = _local_sdist(root, version)
    sdist = local or _download_sdist(root, version)
    try:
        _extract(sdist, target)
    finally:
        if local is None:  # ours to delete: the extracted files are all the tests read
            os.remove(sdist)
    return target


def _local_sdist(root: str, version: str) -> str | None:
    env = os.environ.get("GEB_JAX_LLAMA_CPP_SDIST")
    if env and os.path.isfile(env):
        return env
    path = os.path.join(root, f"llama_cpp_python-{version}.tar.gz")
    return path if os.path.isfile(path) else None


def _download_sdist(root: str, version: str) -> str:
    """pip download the sdist (no build, no dependencies) into the cache root."""
    tmp = tempfile.mkdtemp(prefix=".download-", dir=root)
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               f"llama-cpp-python=={version}", "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
        found = glob.glob(os.path.join(tmp, "llama_cpp_python-*.tar.gz"))
        if proc.returncode != 0 or not found:
            raise RuntimeError(
                f"could not download the llama-cpp-python {version} sdist (for llama.cpp's "
                f"test vocabularies) with `{' '.join(cmd)}`: {proc.stderr[-2000:]}\nPut the "
                f"sdist in {root}/ or name it in $GEB_JAX_LLAMA_CPP_SDIST.")
        path = os.path.join(root, f".{os.path.basename(found[0])}.{os.getpid()}")
        os.replace(found[0], path)
        return path
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _extract(sdist: str, target: str) -> None:
    """Only models/ggml-vocab-* members, flattened, into `target` via a temporary folder."""
    parent = os.path.dirname(target)
    tmp = tempfile.mkdtemp(prefix=".extract-", dir=parent)
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            for member in tar:
                if member.isfile() and fnmatch.fnmatch(member.name, _MEMBERS):
                    src = tar.extractfile(member)
                    with open(os.path.join(tmp, os.path.basename(member.name)), "wb") as dst:
                        shutil.copyfileobj(src, dst)
        if not glob.glob(os.path.join(tmp, "ggml-vocab-*.gguf")):
            raise RuntimeError(f"{sdist} holds no vendor/llama.cpp/models/ggml-vocab-*.gguf")
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first: keep its copy
            if not glob.glob(os.path.join(target, "ggml-vocab-*.gguf")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_cases(gguf_path: str) -> list[tuple[str, list[int]]]:
    """[(text, llama.cpp's ids)] from <gguf>.inp / <gguf>.out, as test-tokenizer-0.cpp reads them.

    The .inp is split at SEPARATOR; line i of the .out holds the ids of text i. The C++ test
    keeps the cases in a map, so a repeated text counts once; we keep the first.
    """
    with open(gguf_path + ".inp", encoding="utf-8", newline="") as f:
        raw = f.read()
    texts = raw.split(SEPARATOR)
    if raw.endswith(SEPARATOR):  # the C++ reader stops at the end: no empty last text
        texts.pop()
    with open(gguf_path + ".out", encoding="utf-8", newline="") as f:
        lines = f.read().splitlines()
    if len(lines) != len(texts):
        raise ValueError(f"{gguf_path}: {len(texts)} texts but {len(lines)} id lines")
    cases: dict[str, list[int]] = {}
    for text, line in zip(texts, lines):
        cases.setdefault(text, [int(x) for x in line.split()])
    return list(cases.items())
