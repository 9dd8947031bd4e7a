"""A run's tokenizer as one byte string, for files that embed it (ONNX metadata, GGUF checksums).

Ours is a SentencePiece .model file: its bytes are the bundle, as before. A published model's
tokenizer is a folder (tokenizer.json + tokenizer_config.json): its bundle is a JSON object
{"geb_jax_tokenizer_folder": 1, "files": {name: text}}, sorted, so equal folders give equal
bytes and a sha256 over the bundle identifies the tokenizer. `unbundle` writes either form
back, atomically.
"""
from __future__ import annotations

import json
import os

from geb_jax.atomic_io import atomic_file, atomic_folder

FOLDER_KEY = "geb_jax_tokenizer_folder"
FOLDER_FILES = ("tokenizer.json", "tokenizer_config.json", "gguf_tokenizer.json")


def bundle(path: str) -> bytes:
    """The bytes of a .model file, or the canonical JSON of a tokenizer folder's files."""
    if not os.path.isdir(path):
        with open(path, "rb") as f:
            return f.read()
    files = {}
    for name in FOLDER_FILES:
        file = os.path.join(path, name)
        if os.path.isfile(file):
            with open(file, encoding="utf-8") as f:
                files[name] = f.read()
    if "tokenizer.json" not in files:
        raise FileNotFoundError(f"tokenizer folder {path} has no tokenizer.json")
    return json.dumps({FOLDER_KEY: 1, "files": files}, sort_keys=True,
                      ensure_ascii=False).encode("utf-8")


def is_folder_bundle(blob: bytes) -> bool:
    """A folder's JSON bundle (a SentencePiece proto starts with a protobuf tag, never "{")."""
    return blob.startswith(b'{"files": ') and blob.rstrip().endswith(
        b'"' + FOLDER_KEY.encode() + b'": 1}')


def unbundle(blob: bytes, target: str) -> str:
    """Write a bundle to `target` (a .model file, or a folder for a folder bundle) atomically."""
    if not is_folder_bundle(blob):
        with atomic_file(target) as f:
            f.write(blob)
        return target
    files = json.loads(blob.decode("utf-8"))["files"]
    with atomic_folder(target) as tmp:
        for name, text in files.items():
            with open(os.path.join(tmp, os.path.basename(name)), "w", encoding="utf-8") as f:
                f.write(text)
    return target
