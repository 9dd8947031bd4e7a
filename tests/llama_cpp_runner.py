"""llama.cpp (llama-cpp-python) in a child process, for tests that compare against it.

Why a child: a llama.cpp build can die with SIGSEGV on a CPU it was not built for (a native
build did on an AVX-512/AMX Xeon); in a child that is one failed test with the build's system
info in the message, not a dead test session.

    logits(path, [ids, ...])            -> list of (len(ids), vocab) float32 arrays
    greedy(path, [ids, ...], n)         -> list of n generated ids each (argmax, no sampler)
    tokenize(path, [text, ...])         -> list of id lists (add_bos=False, special=True)

Run as a script it reads a JSON request on stdin and writes an .npz to the path it names.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import numpy as np

TIMEOUT_S = 900


class LlamaCppError(AssertionError):
    """llama.cpp failed or crashed in the child process."""


def _run(request: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        request = dict(request, out=os.path.join(tmp, "out.npz"))
        proc = subprocess.run([sys.executable, os.path.abspath(__file__)],
                              input=json.dumps(request), capture_output=True, text=True,
                              timeout=TIMEOUT_S, check=False)
        if proc.returncode != 0:
            raise LlamaCppError(
                f"llama.cpp child process exited with {proc.returncode} "
                f"({'signal ' + str(-proc.returncode) if proc.returncode < 0 else 'error'}) "
                f"on {request['op']} {request['path']}:\n{proc.stderr[-3000:]}")
        with np.load(request["out"], allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}


def logits(path: str, sequences: list[list[int]]) -> list[np.ndarray]:
    out = _run({"op": "logits", "path": os.fspath(path), "sequences": sequences})
    return [out[f"s{i}"] for i in range(len(sequences))]


def greedy(path: str, prompts: list[list[int]], n: int) -> list[list[int]]:
    out = _run({"op": "greedy", "path": os.fspath(path), "sequences": prompts, "n": n})
    return [out[f"s{i}"].tolist() for i in range(len(prompts))]


def tokenize(path: str, texts: list[str]) -> list[list[int]]:
    out = _run({"op": "tokenize", "path": os.fspath(path), "texts": texts})
    return [out[f"s{i}"].tolist() for i in range(len(texts))]


def system_info() -> str:
    return str(_run({"op": "info", "path": ""})["info"])


# ---- the child -----------------------------------------------------------------------------

def _child(request: dict) -> dict[str, np.ndarray]:
    import llama_cpp  # pylint: disable=import-outside-toplevel

    op, path = request["op"], request["path"]
    if op == "info":
        return {"info": np.array(llama_cpp.llama_print_system_info().decode())}
    if op == "tokenize":
        llm = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
        return {f"s{i}": np.array(llm.tokenize(t.encode("utf-8"), add_bos=False, special=True),
                                  np.int64) for i, t in enumerate(request["texts"])}
    seqs = request["sequences"]
    n_ctx = max(len(s) for s in seqs) + int(request.get("n", 0)) + 8
    # type_k/v 0 = GGML_TYPE_F32: a float32 KV cache, so the comparison sees the weights' and
    # activations' quantization only.
    llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, n_threads=2,
                          logits_all=True, verbose=False, type_k=0, type_v=0)
    out = {}
    for i, ids in enumerate(seqs):
        llm.reset()
        llm.eval(list(ids))
        if op == "logits":
            out[f"s{i}"] = np.array(llm.scores[:len(ids)], np.float32)
            continue
        generated = []
        for _ in range(int(request["n"])):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            generated.append(token)
            llm.eval([token])
        out[f"s{i}"] = np.array(generated, np.int64)
    return out


if __name__ == "__main__":
    req = json.loads(sys.stdin.read())
    np.savez(req["out"], **_child(req))
