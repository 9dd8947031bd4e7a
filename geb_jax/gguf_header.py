"""The GGUF container: parse and check a header, and the tokenizer checksum; no model semantics.

Shared by the numpy engine's model reader (infer/gguf_file.py), the exporter
(export/gguf_export.py) and the tokenizer reader (data/gguf_vocab.py), so every GGUF the project
reads passes the same checks. Numpy and the `gguf` package only: no jax, no geb_jax.infer, so
the data package can import it.

Checks before any tensor is used (as llama.cpp's gguf.cpp does; each raises GGUFFileError naming
the file, the tensor or key, and the numbers): magic, version 2 or 3, little-endian; every
length inside the file; no duplicate keys or tensor names; general.alignment a uint32 power of
two (default 32); at most 4 dims; a known ggml type whose block size divides ne[0]; each
tensor's byte size from its type and shape; offsets aligned and contiguous in header order
(offset == previous offset + previous size padded to the alignment: llama.cpp's "tensor ... has
offset X, expected Y"), so nothing overlaps; every tensor inside the file and nothing after the
last one's padding. A flipped tensor type or a moved offset therefore cannot load silently.

Tokenizer checksum (`TOKENIZER_SHA256_KEY`, written by geb_jax's exporter, verified on read when
present): sha256, as 64 lowercase hex digits, over the GGUF key/value records of every key that
starts with "tokenizer." or "geb_jax.tokenizer." (except the checksum key itself), in ascending
order of key; each record exactly as little-endian GGUF serializes it: u64 key length, key bytes,
u32 value type, value (u64 length + bytes for a string; u32 element type, u64 count, elements
for an array; numbers little-endian; bool one byte). That covers tokens, scores, types, merges,
special ids, flags, chat template and the embedded SentencePiece model.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import mmap
import os
import struct
from typing import Any, Mapping

import numpy as np

# The exporter also stores the original SentencePiece model (base64 of the serialized proto)
# under this key, so the numpy engine gets back the exact tokenizer; llama.cpp ignores it.
SENTENCEPIECE_MODEL_KEY = "geb_jax.tokenizer.sentencepiece_model"
TOKENIZER_SHA256_KEY = "geb_jax.tokenizer.sha256"
GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME = 64  # GGML_MAX_NAME: names must be shorter


class GGUFFileError(ValueError):
    """A GGUF file that is truncated, corrupt, or holds a model the numpy engine cannot run."""


class GGUFTruncatedError(GGUFFileError):
    """The header ends before its records do; `detail` is the message without the path (the
    tokenizer reader words it its own way)."""

    def __init__(self, path: str, detail: str):
        super().__init__(path, detail)  # both in args: the error pickles
        self.path, self.detail = path, detail

    def __str__(self) -> str:
        return f"{self.path}: {self.detail}"


# ---- GGUF value encoding (the key/value section) -------------------------------------------
# GGUF value type codes -> (struct format, numpy dtype) of the little-endian scalars.
_SCALARS = {0: ("<B", "<u1"), 1: ("<b", "<i1"), 2: ("<H", "<u2"), 3: ("<h", "<i2"),
            4: ("<I", "<u4"), 5: ("<i", "<i4"), 6: ("<f", "<f4"), 7: ("<B", "<u1"),
            10: ("<Q", "<u8"), 11: ("<q", "<i8"), 12: ("<d", "<f8")}
_BOOL, _STRING, _ARRAY, _UINT32 = 7, 8, 9, 4
_U64 = struct.Struct("<Q")


def _text(raw: bytes) -> str:
    """GGUF strings are UTF-8; a token that is not decodes with surrogateescape, so
    `s.encode("utf-8", "surrogateescape")` gives back its exact bytes."""
    return raw.decode("utf-8", "surrogateescape")


def _encode_string(value: str | bytes) -> bytes:
    raw = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else bytes(value)
    return _U64.pack(len(raw)) + raw


def encode_kv(key: str, value: Any, value_type: int, sub_type: int | None = None) -> bytes:
    """One key/value record as a little-endian GGUF file stores it (as gguf.GGUFWriter packs
    it: an array's element type is `sub_type` or inferred from its first element)."""
    import gguf  # pylint: disable=import-outside-toplevel

    def value_bytes(v: Any, t: int) -> bytes:
        if t == _STRING:
            return _encode_string(v)
        if t in _SCALARS:
            return struct.pack(_SCALARS[t][0], int(bool(v)) if t == _BOOL else v)
        raise GGUFFileError(f"cannot encode GGUF value of type {t} for key {key!r}")

    value_type = int(value_type)
    out = _encode_string(key) + struct.pack("<I", value_type)
    if value_type != _ARRAY:
        return out + value_bytes(value, value_type)
    if sub_type is not None:
        item_type = int(sub_type)
    elif isinstance(value, (bytes, bytearray)):
        item_type = 0  # gguf packs a bytes object as a uint8 array
    else:
        item_type = int(gguf.GGUFValueType.get_type(value[0]))
    return out + struct.pack("<IQ", item_type, len(value)) + b"".join(
        value_bytes(v, item_type) for v in value)


def is_tokenizer_key(key: str) -> bool:
    """Keys the tokenizer checksum covers (see the module docstring)."""
    return key.startswith(("tokenizer.", "geb_jax.tokenizer.")) and key != TOKENIZER_SHA256_KEY


def tokenizer_sha256(records: Mapping[str, bytes]) -> str:
    """sha256 hex of the tokenizer keys' serialized records ({key: record}), in key order."""
    digest = hashlib.sha256()
    for key in sorted(k for k in records if is_tokenizer_key(k)):
        digest.update(records[key])
    return digest.hexdigest()


def tokenizer_sha256_of_writer(writer) -> str:
    """The checksum of the tokenizer keys added so far to a gguf.GGUFWriter (for the exporter;
    add the result under TOKENIZER_SHA256_KEY before writing the header)."""
    values = writer.kv_data[0]
    return tokenizer_sha256({k: encode_kv(k, v.value, v.type, v.sub_type)
                             for k, v in values.items() if is_tokenizer_key(k)})


# ---- the header: parse and check -------------------------------------------------------------

@dataclasses.dataclass
class TensorInfo:
    """One tensor-info record of the header. `ne` is ggml order (ne[0] = row length); `offset`
    is relative to the data section; `record` is the byte where the record starts."""
    name: str
    ne: tuple[int, ...]
    ggml_type: int
    offset: int
    record: int
    nbytes: int = 0

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy / torch order: (rows, cols) for a matrix."""
        return tuple(reversed(self.ne))

    @property
    def type_name(self) -> str:
        return _type_name(self.ggml_type)


@dataclasses.dataclass
class GGUFHeader:
    """A parsed, checked GGUF header and the file's bytes (memory-mapped, read-only).
    fields: every key -> Python value (arrays as lists); spans: key -> (start, end) bytes of
    its record in the file."""
    path: str
    version: int
    fields: dict[str, Any]
    spans: dict[str, tuple[int, int]]
    types: dict[str, tuple[int, int | None]]  # key -> (value type, array element type)
    tensors: list[TensorInfo]
    alignment: int
    data_start: int
    file_size: int
    buffer: Any

    def raw(self, tensor: TensorInfo) -> np.ndarray:
        """The tensor's bytes (uint8, a view of the mapped file)."""
        return np.frombuffer(self.buffer, np.uint8, tensor.nbytes,
                             self.data_start + tensor.offset)

    def record(self, key: str) -> bytes:
        start, end = self.spans[key]
        return self.buffer[start:end]

    def array(self, key: str) -> np.ndarray | None:
        """A numeric array field as numpy, None for any other field (`fields` holds lists;
        readers of 10^5 scores or token types want arrays)."""
        value_type, item_type = self.types[key]
        if value_type != _ARRAY or item_type == _STRING:
            return None
        return np.asarray(self.fields[key], bool if item_type == _BOOL else _SCALARS[item_type][1])


def _type_name(ggml_type: int) -> str:
    import gguf  # pylint: disable=import-outside-toplevel
    try:
        return gguf.GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"unknown type {ggml_type}"


class _Cursor:
    """Bounds-checked little-endian reads from the mapped file."""

    def __init__(self, buf, path: str):
        self.buf, self.path, self.pos, self.size = buf, path, 0, len(buf)

    def take(self, n: int, what: str) -> int:
        if n > self.size - self.pos:
            raise GGUFTruncatedError(
                self.path, f"the header ends early: {what} needs {n} bytes at byte {self.pos} "
                f"but the file has {self.size} (truncated or corrupt? re-export or re-download "
                f"it)")
        start = self.pos
        self.pos += n
        return start

    def scalar(self, value_type: int, what: str):
        fmt = _SCALARS[value_type][0]
        value = struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt), what))[0]
        return value != 0 if value_type == _BOOL else value

    def u32(self, what: str) -> int:
        return self.scalar(4, what)

    def u64(self, what: str) -> int:
        return self.scalar(10, what)

    def raw_string(self, what: str) -> bytes:
        n = self.u64(what)
        start = self.take(n, what)
        return self.buf[start:start + n]

    def strings(self, count: int, what: str) -> list[bytes]:
        """`count` strings (the token / merge arrays: this loop is the header's hot path)."""
        buf, pos, size, unpack = self.buf, self.pos, self.size, _U64.unpack_from
        out = []
        for i in range(count):
            if pos + 8 > size:
                self.pos = pos
                self.take(8, f"the length of {what}[{i}]")  # raises
            n = unpack(buf, pos)[0]
            if n > size - pos - 8:
                self.pos = pos + 8
                self.take(n, f"{what}[{i}]")  # raises
            out.append(buf[pos + 8:pos + 8 + n])
            pos += 8 + n
        self.pos = pos
        return out


def _read_value(cur: _Cursor, key: str) -> tuple[Any, int, int | None]:
    """(Python value, value type, element type) of the value at the cursor."""
    value_type = cur.u32(f"the type of key {key!r}")
    if value_type == _STRING:
        return _text(cur.raw_string(f"key {key!r}")), value_type, None
    if value_type in _SCALARS:
        return cur.scalar(value_type, f"key {key!r}"), value_type, None
    if value_type != _ARRAY:
        raise GGUFFileError(f"{cur.path}: key {key!r} has invalid GGUF value type {value_type} "
                            f"(corrupt header?)")
    item_type = cur.u32(f"the element type of key {key!r}")
    count = cur.u64(f"the length of key {key!r}")
    if item_type == _STRING:
        if count > (cur.size - cur.pos) // 8:
            cur.take(count * 8, f"the {count} strings of key {key!r}")  # raises
        return [_text(s) for s in cur.strings(count, f"key {key!r}")], value_type, item_type
    if item_type not in _SCALARS:
        raise GGUFFileError(f"{cur.path}: array key {key!r} has invalid element type {item_type} "
                            f"(nested arrays are not GGUF; corrupt header?)")
    dtype = np.dtype(_SCALARS[item_type][1])
    start = cur.take(count * dtype.itemsize, f"the {count} values of key {key!r}")
    values = np.frombuffer(cur.buf, dtype, count, start)
    return (values != 0 if item_type == _BOOL else values).tolist(), value_type, item_type


def _read_fields(cur: _Cursor, n_kv: int):
    fields, spans, types = {}, {}, {}
    for i in range(n_kv):
        start = cur.pos
        key = _text(cur.raw_string(f"key {i}"))
        if not key:
            raise GGUFFileError(f"{cur.path}: key {i} (byte {start}) is empty (corrupt header?)")
        if key in fields:
            raise GGUFFileError(f"{cur.path}: key {key!r} appears twice (corrupt header?)")
        value, value_type, item_type = _read_value(cur, key)
        fields[key], spans[key], types[key] = value, (start, cur.pos), (value_type, item_type)
    return fields, spans, types


@functools.lru_cache(maxsize=None)
def _block(ggml_type: int) -> tuple[int, int] | None:
    """(values per block, bytes per block) of a ggml type, None if gguf does not know it."""
    import gguf  # pylint: disable=import-outside-toplevel
    try:
        return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        return None


def _read_tensor_info(cur: _Cursor, index: int) -> TensorInfo:
    start = cur.pos
    name = _text(cur.raw_string(f"the name of tensor {index}"))
    if len(name.encode("utf-8", "surrogateescape")) >= MAX_NAME:
        raise GGUFFileError(f"{cur.path}: tensor {index} name {name[:80]!r} is "
                            f"{len(name)} bytes; ggml allows < {MAX_NAME} (corrupt header?)")
    n_dims = cur.u32(f"the dims of tensor {name!r}")
    if n_dims > MAX_DIMS:
        raise GGUFFileError(f"{cur.path}: tensor {name!r} has {n_dims} dimensions; ggml allows "
                            f"at most {MAX_DIMS} (corrupt header?)")
    ne = tuple(cur.scalar(11, f"the shape of tensor {name!r}") for _ in range(n_dims))
    ggml_type = cur.u32(f"the type of tensor {name!r}")
    offset = cur.u64(f"the offset of tensor {name!r}")
    info = TensorInfo(name, ne, ggml_type, offset, start)
    info.nbytes = _tensor_nbytes(info, cur.path)
    return info


def _tensor_nbytes(t: TensorInfo, path: str) -> int:
    """Bytes from type and shape (ggml_nbytes), after llama.cpp's shape and type checks."""
    if any(n < 0 for n in t.ne):
        raise GGUFFileError(f"{path}: tensor {t.name!r} has a negative dimension {t.ne} "
                            f"(corrupt header?)")
    block = _block(t.ggml_type)
    if block is None:
        raise GGUFFileError(f"{path}: tensor {t.name!r} has ggml type {t.ggml_type}, which the "
                            f"installed gguf package does not know (corrupt header, or a newer "
                            f"type: upgrade gguf).")
    size, type_size = block
    row = t.ne[0] if t.ne else 1
    if row % size:
        raise GGUFFileError(f"{path}: tensor {t.name!r} is {t.type_name} with {row} values per "
                            f"row, not a multiple of its block size {size} (corrupt header?)")
    return math.prod(t.ne) // size * type_size  # Python ints: no overflow


def _pad(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def _alignment(fields, types, path: str) -> int:
    if "general.alignment" not in fields:
        return DEFAULT_ALIGNMENT
    value = fields["general.alignment"]
    if types["general.alignment"][0] != _UINT32 or value <= 0 or value & (value - 1):
        raise GGUFFileError(f"{path}: general.alignment must be a uint32 power of two, got "
                            f"{value!r} (corrupt header?)")
    return value


def _describe(t: TensorInfo) -> str:
    return f"{t.name!r} ({t.type_name}, shape {list(t.ne)}, {t.nbytes} bytes)"


def _check_layout(h: GGUFHeader) -> None:
    """Offsets aligned and contiguous in header order, all data inside the file, no trailing
    bytes after the last tensor's padding (llama.cpp: "has offset X, expected Y")."""
    expected, previous = 0, None
    for t in h.tensors:
        if t.offset % h.alignment:
            raise GGUFFileError(f"{h.path}: tensor {t.name!r} has data offset {t.offset}, not a "
                                f"multiple of general.alignment {h.alignment} (corrupt header?)")
        if t.offset != expected:
            after = ("the data section starts with it" if previous is None else
                     f"it follows {_describe(previous)} padded to {h.alignment}")
            raise GGUFFileError(
                f"{h.path}: tensor {t.name!r} has data offset {t.offset}, expected {expected}: "
                f"{after}. A tensor type, shape or offset in the header is wrong (damaged "
                f"file); re-export or re-download it.")
        end = h.data_start + t.offset + t.nbytes
        if end > h.file_size:
            raise GGUFFileError(f"{h.path} is truncated: tensor {_describe(t)} needs bytes up to "
                                f"{end} but the file has {h.file_size}; re-export or "
                                f"re-download it.")
        expected, previous = t.offset + _pad(t.nbytes, h.alignment), t
    limit = h.data_start + expected if h.tensors else _pad(h.data_start, h.alignment)
    if h.file_size > limit:
        last = f"the last tensor {_describe(previous)}" if previous else "the header"
        raise GGUFFileError(
            f"{h.path}: {h.file_size - limit} unexpected bytes after {last} (data ends at "
            f"{limit}, the file has {h.file_size}): a tensor type or shape in the header is "
            f"wrong (damaged file); re-export or re-download it.")


def _check_tokenizer(h: GGUFHeader) -> None:
    if TOKENIZER_SHA256_KEY not in h.fields:
        return
    stored = h.fields[TOKENIZER_SHA256_KEY]
    computed = tokenizer_sha256({k: h.record(k) for k in h.spans if is_tokenizer_key(k)})
    if stored != computed:
        raise GGUFFileError(
            f"{h.path}: the tokenizer metadata does not match {TOKENIZER_SHA256_KEY} (stored "
            f"{str(stored)[:16]}..., computed {computed[:16]}...): a token, score, merge, "
            f"special id, chat template or the embedded SentencePiece model was changed or "
            f"damaged after export; re-export the model.")


def read_gguf_header(path: str | os.PathLike) -> GGUFHeader:
    """Parse and check a GGUF file's header (module docstring: what is checked). Fast: one
    pass in Python over the key/value and tensor-info records; tensor data stay on disk."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise GGUFFileError(f"GGUF file not found: {path}")
    size = os.path.getsize(path)
    if size < 24:
        raise GGUFFileError(f"{path} is not a GGUF file: {size} bytes (truncated?)")
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    cur = _Cursor(buf, path)
    if buf[:4] != GGUF_MAGIC:
        raise GGUFFileError(f"{path} is not a GGUF file: it starts with {bytes(buf[:4])!r}, "
                            f"not {GGUF_MAGIC!r}")
    cur.pos = 4
    version = cur.u32("the version")
    if version & 0xFFFF == 0 and version:
        raise GGUFFileError(f"{path}: GGUF version {version:#x} looks byte-swapped: a big-endian "
                            f"file; the numpy engine reads little-endian GGUF only.")
    if version not in (2, 3):
        raise GGUFFileError(f"{path}: GGUF version {version}; the reader handles versions 2 and "
                            f"3 (re-convert it with a current llama.cpp).")
    n_tensors, n_kv = cur.u64("the tensor count"), cur.u64("the key count")
    if n_tensors > size // 8 or n_kv > size // 8:
        raise GGUFFileError(f"{path}: header claims {n_tensors} tensors and {n_kv} keys in a "
                            f"{size}-byte file (corrupt header?)")
    fields, spans, types = _read_fields(cur, n_kv)
    alignment = _alignment(fields, types, path)
    tensors, names = [], set()
    for i in range(n_tensors):
        t = _read_tensor_info(cur, i)
        if t.name in names:
            raise GGUFFileError(f"{path}: tensor name {t.name!r} appears twice (corrupt header?)")
        names.add(t.name)
        tensors.append(t)
    header = GGUFHeader(path, version, fields, spans, types, tensors, alignment,
                        _pad(cur.pos, alignment) if tensors else cur.pos, size, buf)
    _check_layout(header)
    _check_tokenizer(header)
    return header


# ---- tokenizer metadata --------------------------------------------------------------------

def read_tokenizer_metadata(path_or_reader) -> dict[str, Any]:
    """Every "tokenizer.*" field as Python values, under its GGUF key: tokenizer.ggml.tokens
    (list[str]), .scores (list[float]), .token_type (list[int]), .merges (list[str]), .model,
    .pre, .bos_token_id / eos / eot / eom / padding / unknown / seperator ids, .add_bos_token,
    .add_eos_token, tokenizer.chat_template, ... Keys absent from the file are absent here
    (llama.cpp's defaults depend on the tokenizer model). Takes a path (parsed and checked,
    tokenizer checksum included), a GGUFHeader or a gguf.GGUFReader (decoded from its parts
    arrays: reading 49k tokens through ReaderField.contents() is much slower)."""
    if isinstance(path_or_reader, GGUFHeader):
        fields = path_or_reader.fields
    elif isinstance(path_or_reader, (str, os.PathLike)):
        fields = read_gguf_header(path_or_reader).fields
    else:
        fields = {k: _reader_value(f) for k, f in path_or_reader.fields.items()
                  if k.startswith("tokenizer.")}
    return {k: v for k, v in fields.items() if k.startswith("tokenizer.")}


def _reader_value(field) -> Any:
    """A gguf.ReaderField as a Python value, from its parts arrays in bulk."""
    parts = [field.parts[i] for i in field.data]
    value_type = int(field.types[0])
    item_type = int(field.types[-1])
    if item_type == _STRING:
        values = [_text(p.tobytes()) for p in parts]
    else:
        flat = np.concatenate(parts) if parts else np.zeros(0)
        values = (flat != 0 if item_type == _BOOL else flat).tolist()
    return values if value_type == _ARRAY else values[0]


# ---- tensor types ----------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def readable_types() -> tuple[str, ...]:
    """The ggml types the installed gguf package can dequantize (asked, not listed: each type
    is tried on one zero block)."""
    import gguf  # pylint: disable=import-outside-toplevel

    found = []
    for qtype, (_, type_size) in gguf.GGML_QUANT_SIZES.items():
        try:
            gguf.quants.dequantize(np.zeros((1, type_size), np.uint8), qtype)
        except (NotImplementedError, ValueError, TypeError, KeyError):
            continue
        found.append(qtype.name)
    return tuple(found)

