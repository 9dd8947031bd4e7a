"""SentencePiece BPE tokenizer trained the LLaMA way, for bilingual English + Chinese + code.

Why these trainer settings (see `TRAINER_OPTIONS`):
  * BPE with byte_fallback: any character outside the vocabulary is spelled as UTF-8 byte
    pieces <0x..> instead of <unk>, so nothing is ever lost (emoji, rare Chinese characters).
  * normalization "identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
    allow_whitespace_only_pieces=True: the text is not rewritten (no NFKC, no collapsing of
    spaces, no leading space added), so decode(encode(x)) == x exactly - code indentation, runs
    of spaces, tabs and newlines survive, and runs of spaces become a few whitespace pieces.
  * split_digits: every digit is its own piece, which helps small models with arithmetic and
    keeps numbers from eating vocabulary.
  * character_coverage 0.9995 keeps almost all Chinese characters as single pieces. A tiny
    vocabulary cannot hold them all, so then only the most frequent characters are kept (at
    most half the learnable slots, see `_rare_characters`); the rest fall back to bytes.
  * Ids: <pad>=0, <unk>=1, <s>=2 (bos), </s>=3 (eos), then the chat-role tokens
    <|system|> <|user|> <|assistant|> <|end|> (user_defined_symbols: always one piece, even
    inside raw text), then the 256 byte pieces, then learned merges.
  * The vocabulary size is rounded UP to a multiple of 128 (GEB uses 64,896 = 507 * 128) so the
    embedding / LM-head matrices tile well on accelerators. Recommendation: make the model's
    vocab_size equal to the tokenizer's (rounded) vocab_size; `Tokenizer.check_matches_model`
    enforces that, or with allow_padding=True accepts a model vocab that is larger (e.g. a
    checkpoint whose embedding was padded further); never smaller, as ids would be out of range.

SentencePiece itself turns spaces into U+2581 ("▁") internally, so a literal "▁" in the input
would come back as a space. `Tokenizer.encode` spells a literal "▁" with its three byte pieces,
which decode back to "▁", so the round trip is exact for every Unicode string.
"""
from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import time
from typing import Iterable, Iterator, Sequence

import sentencepiece as spm

from geb_jax.atomic_io import atomic_file

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
CHAT_ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
VOCAB_MULTIPLE = 128
GEB_VOCAB_SIZE = 64_896
N_BYTE_PIECES = 256
# pad, unk, bos, eos + chat roles + 256 byte pieces: the part of the vocabulary that is fixed.
N_RESERVED = 4 + len(CHAT_ROLE_TOKENS) + N_BYTE_PIECES
# SentencePiece silently drops training sentences longer than this (bytes); we cut documents
# into line-aligned pieces no longer than it so no text is lost.
MAX_SENTENCE_BYTES = 8192
DEFAULT_CHARACTER_COVERAGE = 0.9995
_META_SPACE = "\u2581"  # "▁", SentencePiece's stand-in for a space

TRAINER_OPTIONS = dict(
    model_type="bpe",
    split_digits=True,
    byte_fallback=True,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True,
    add_dummy_prefix=False,
    split_by_whitespace=True,
    max_sentencepiece_length=16,
    max_sentence_length=MAX_SENTENCE_BYTES,
    pad_id=0, unk_id=1, bos_id=2, eos_id=3,
    pad_piece=PAD, unk_piece=UNK, bos_piece=BOS, eos_piece=EOS,
    user_defined_symbols=list(CHAT_ROLE_TOKENS),
    hard_vocab_limit=True,
)


class TokenizerError(ValueError):
    """A tokenizer file is unusable, or a tokenizer does not fit a model."""


def round_vocab_size(vocab_size: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """Round up to a multiple of `multiple` (128): matrix dims that tile well on TPU/GPU."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return -(-vocab_size // multiple) * multiple


def _training_sentences(texts: Iterable[str], max_bytes: int = MAX_SENTENCE_BYTES
                        ) -> Iterator[str]:
    """Cut each document into runs of whole lines (newlines kept) of at most max_bytes bytes.

    Keeping "\\n" inside the training sentences lets BPE learn newline and indentation pieces
    (code); cutting at line ends keeps sentences under SentencePiece's length limit, beyond
    which it would silently skip them.
    """
    for text in texts:
        if not text:
            continue
        buf: list[str] = []
        size = 0
        for line in text.splitlines(keepends=True):
            n = len(line.encode("utf-8"))
            if n > max_bytes:  # one enormous line: cut it at character boundaries
                if buf:
                    yield "".join(buf)
                    buf, size = [], 0
                piece, psize = [], 0
                for ch in line:
                    b = len(ch.encode("utf-8"))
                    if psize + b > max_bytes:
                        yield "".join(piece)
                        piece, psize = [], 0
                    piece.append(ch)
                    psize += b
                if piece:
                    yield "".join(piece)
                continue
            if buf and size + n > max_bytes:
                yield "".join(buf)
                buf, size = [], 0
            buf.append(line)
            size += n
        if buf:
            yield "".join(buf)


def _rare_characters(char_counts: collections.Counter, max_chars: int,
                     coverage: float) -> set[str]:
    """Characters to leave out of a small vocabulary (empty set when everything fits).

    SentencePiece adds characters, most frequent first, until `character_coverage` of the
    text is covered, refuses a coverage below 0.98, and fails when those characters do not fit
    the vocabulary. Chinese has thousands of distinct characters, so a small vocabulary (say
    1024) cannot reach even 98%. In that case we keep the `max_chars` most frequent characters
    and return the rest; the caller cuts training sentences at them (they will be spelled with
    byte pieces at encode time anyway, so no merge should cross them) and trains with
    coverage 1.0 over what remains.
    """
    total = sum(char_counts.values())
    ranked = char_counts.most_common()
    needed, covered = 0, 0
    for _, n in ranked:  # how many characters the requested coverage would need
        if covered >= coverage * total:
            break
        covered += n
        needed += 1
    if needed <= max_chars:
        return set()
    return {ch for ch, _ in ranked[max_chars:]}


def _cut_at(sentences: Iterable[str], rare: set[str]) -> Iterator[str]:
    """Split sentences at (and drop) the rare characters."""
    for s in sentences:
        start = 0
        for i, ch in enumerate(s):
            if ch in rare:
                if i > start:
                    yield s[start:i]
                start = i + 1
        if start < len(s):
            yield s[start:]


class Tokenizer:
    """A thin wrapper around SentencePieceProcessor with the GEB special tokens.

    Keeps the processor plus the file it came from (for error messages) and exposes only what
    training and serving need: exact-round-trip encode/decode, the special ids, and a check
    that the tokenizer and the model agree on the vocabulary size.
    """

    def __init__(self, processor: spm.SentencePieceProcessor, path: str | None = None):
        self._sp = processor
        self.path = path
        where = path or "<in-memory model>"
        missing = [p for p in (PAD, BOS, EOS, *CHAT_ROLE_TOKENS)
                   if processor.piece_to_id(p) == processor.unk_id() or
                   processor.id_to_piece(processor.piece_to_id(p)) != p]
        if missing or processor.pad_id() != 0:
            raise TokenizerError(
                f"{where} is a SentencePiece model but not a geb_jax tokenizer: "
                f"missing special tokens {missing} or pad id {processor.pad_id()} != 0")
        self._meta_space_bytes = [processor.piece_to_id(f"<0x{b:02X}>")
                                  for b in _META_SPACE.encode("utf-8")]
        if processor.unk_id() in self._meta_space_bytes:
            raise TokenizerError(f"{where} has no byte-fallback pieces (byte_fallback=False?)")

    # -- loading ---------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load a .model file; a missing or corrupt file raises an error that names it."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer model file not found: {path}")
        with open(path, "rb") as f:
            blob = f.read()
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(blob)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError on a bad proto
            raise TokenizerError(
                f"tokenizer model file {path} is not a valid SentencePiece model "
                f"({len(blob)} bytes): {e}") from e
        if sp.get_piece_size() == 0:
            raise TokenizerError(f"tokenizer model file {path} has an empty vocabulary")
        return cls(sp, path)

    def save(self, path: str | os.PathLike) -> str:
        """Write the serialized model to `path` (a .model file) atomically; returns the path."""
        path = os.fspath(path)
        with atomic_file(path) as f:
            f.write(self._sp.serialized_model_proto())
        return path

    # -- ids ------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    @property
    def role_ids(self) -> dict[str, int]:
        """{"<|system|>": id, "<|user|>": id, "<|assistant|>": id, "<|end|>": id}."""
        return {t: self._sp.piece_to_id(t) for t in CHAT_ROLE_TOKENS}

    @property
    def system_id(self) -> int:
        return self._sp.piece_to_id("<|system|>")

    @property
    def user_id(self) -> int:
        return self._sp.piece_to_id("<|user|>")

    @property
    def assistant_id(self) -> int:
        return self._sp.piece_to_id("<|assistant|>")

    @property
    def end_id(self) -> int:
        return self._sp.piece_to_id("<|end|>")

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(i)

    def piece_to_id(self, piece: str) -> int:
        return self._sp.piece_to_id(piece)

    # -- encode / decode ------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Text -> ids, exactly invertible by `decode`.

        The chat-role strings (e.g. "<|user|>") in `text` become their single special ids, so
        escape them in untrusted user input if that matters. A literal "▁" is emitted as its
        byte pieces (SentencePiece would otherwise read it as a space).
        """
        if _META_SPACE in text:
            ids: list[int] = []
            for k, part in enumerate(text.split(_META_SPACE)):
                if k:
                    ids.extend(self._meta_space_bytes)
                if part:
                    ids.extend(self._sp.encode(part))
        else:
            ids = self._sp.encode(text)
        if add_bos:
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False,
                     add_eos: bool = False) -> list[list[int]]:
        """Many texts at once (SentencePiece's multi-threaded path when no "▁" is present)."""
        if any(_META_SPACE in t for t in texts):
            return [self.encode(t, add_bos, add_eos) for t in texts]
        out = self._sp.encode(list(texts), add_bos=add_bos, add_eos=add_eos)
        return [list(ids) for ids in out]

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text. pad/bos/eos decode to nothing; chat-role tokens to their text."""
        return self._sp.decode([int(i) for i in ids])

    # -- consistency with the model ---------------------------------------------------------
    def check_matches_model(self, model_vocab_size: int, allow_padding: bool = False) -> None:
        """Raise TokenizerError unless the model's vocab_size fits this tokenizer.

        Default: they must be equal (the recommended setup: the tokenizer vocabulary is already
        rounded to a multiple of 128, so the model needs no extra padding rows). With
        allow_padding=True a larger model vocabulary is accepted (unused embedding rows); a
        smaller one is always an error because some token ids would index past the embedding.
        """
        check_vocab_fits(self.vocab_size, model_vocab_size, allow_padding,
                         self.path or "<in-memory model>")

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, path={self.path!r})"


def check_vocab_fits(tokenizer_vocab: int, model_vocab: int, allow_padding: bool,
                     where: str) -> None:
    """TokenizerError unless a model of `model_vocab` rows can embed every token id (equal, or
    larger with allow_padding). Shared by every tokenizer backend."""
    ok = model_vocab >= tokenizer_vocab if allow_padding else model_vocab == tokenizer_vocab
    if not ok:
        need = "at least" if allow_padding else "exactly"
        raise TokenizerError(
            f"tokenizer/model vocabulary mismatch: tokenizer {where} has vocab_size "
            f"{tokenizer_vocab} but the model has vocab_size {model_vocab}; the model needs "
            f"{need} {tokenizer_vocab} (set ModelConfig.vocab_size={tokenizer_vocab})")


def train_tokenizer(texts: Iterable[str], vocab_size: int, output_prefix: str | os.PathLike,
                    character_coverage: float = DEFAULT_CHARACTER_COVERAGE,
                    num_threads: int | None = None, verbose: bool = False) -> Tokenizer:
    """Train a BPE tokenizer on `texts` and write `<output_prefix>.model` atomically.

    `vocab_size` is rounded up to a multiple of 128; the result has exactly that many pieces
    (SentencePiece errors out if the corpus is too small to learn them). The texts are read
    once into memory (they are cut into line-aligned sentences and character counts are needed
    to size character_coverage); SentencePiece then trains from the in-memory iterator. The
    model is written to a temporary name and renamed, so a concurrent reader never sees a
    half-written file.
    """
    vocab = round_vocab_size(vocab_size)
    if vocab <= N_RESERVED:
        raise ValueError(f"vocab_size {vocab} leaves no room for learned pieces: "
                         f"{N_RESERVED} ids are reserved for specials and byte pieces")
    sentences = list(_training_sentences(texts))
    if not sentences:
        raise ValueError("train_tokenizer got no text")
    counts: collections.Counter = collections.Counter()
    for s in sentences:
        counts.update(s)
    if " " in counts:  # SentencePiece counts spaces as "▁"
        counts[_META_SPACE] += counts.pop(" ")
    # Keep at most half the learnable slots for single characters, the rest for merges.
    rare = _rare_characters(counts, (vocab - N_RESERVED) // 2, character_coverage)
    coverage = character_coverage
    if rare:
        sentences = list(_cut_at(sentences, rare))
        coverage = 1.0

    writer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=writer, vocab_size=vocab,
            character_coverage=coverage, num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=0 if verbose else 2, **TRAINER_OPTIONS)
    except RuntimeError as e:
        raise TokenizerError(
            f"SentencePiece could not train a {vocab}-piece tokenizer on {len(sentences)} "
            f"sentences ({sum(counts.values())} characters): {e}") from e

    path = os.fspath(output_prefix) + ".model"
    with atomic_file(path) as f:
        f.write(writer.getvalue())
    return Tokenizer.load(path)


def chars_per_token(tokenizer: Tokenizer, texts: Iterable[str]) -> float:
    """Compression: total characters / total tokens (no bos/eos). Higher is better."""
    n_chars = n_tokens = 0
    for text in texts:
        n_chars += len(text)
        n_tokens += len(tokenizer.encode(text))
    if n_tokens == 0:
        raise ValueError("chars_per_token needs at least one non-empty text")
    return n_chars / n_tokens


def _settings_key() -> str:
    """Hash of everything besides vocab size and corpus that changes the trained model."""
    blob = json.dumps({"opts": TRAINER_OPTIONS, "coverage": DEFAULT_CHARACTER_COVERAGE,
                       "sentences": MAX_SENTENCE_BYTES, "sp": spm.__version__}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def default_cache_dir() -> str:
    """$GEB_JAX_CACHE, else $XDG_CACHE_HOME/geb_jax, else ~/.cache/geb_jax."""
    if os.environ.get("GEB_JAX_CACHE"):
        return os.environ["GEB_JAX_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "geb_jax")


def builtin_tokenizer(vocab_size: int = GEB_VOCAB_SIZE, cache_dir: str | None = None,
                      verbose: bool = False) -> Tokenizer:
    """The tokenizer trained on the built-in corpus' train split, cached on disk.

    The cache file name holds the rounded vocab size, the corpus version (a hash of the shipped
    data) and a hash of the trainer settings, so a regenerated corpus or changed settings never
    reuse a stale model. A corrupt cached file is retrained. Training on ~3 MB takes seconds.
    """
    from geb_jax.data.corpus import builtin_texts, corpus_version

    vocab = round_vocab_size(vocab_size)
    cache_dir = cache_dir or default_cache_dir()
    prefix = os.path.join(cache_dir, f"builtin-{corpus_version()}-{_settings_key()}-v{vocab}")
    if os.path.exists(prefix + ".model"):
        try:
            return Tokenizer.load(prefix + ".model")
        except TokenizerError:
            pass  # e.g. a truncated file from a crashed run: retrain below
    start = time.perf_counter()
    tok = train_tokenizer(builtin_texts("train"), vocab, prefix, verbose=verbose)
    if verbose:
        print(f"trained {tok} in {time.perf_counter() - start:.1f}s")
    return tok


def fingerprint(tokenizer: Tokenizer) -> str:
    """sha256 (hex) of the serialized SentencePiece model: equal iff the ids are the same.

    Pre-tokenized data records it, so training refuses ids made by another tokenizer.
    """
    return hashlib.sha256(tokenizer._sp.serialized_model_proto()).hexdigest()


def chars_per_token_report(tokenizer: Tokenizer, split: str = "valid",
                           langs: Sequence[str] = ("en", "zh", "code")) -> dict[str, dict]:
    """{lang: {"documents", "characters", "tokens", "chars_per_token"}} on a built-in split.

    Held-out ("valid") by default: the tokenizer was trained on "train". No bos/eos counted.
    """
    from geb_jax.data.corpus import builtin_texts

    report = {}
    for lang in langs:
        texts = list(builtin_texts(split, lang))
        n_chars = sum(len(t) for t in texts)
        n_tokens = sum(len(ids) for ids in tokenizer.encode_batch(texts))
        report[lang] = {"documents": len(texts), "characters": n_chars, "tokens": n_tokens,
                        "chars_per_token": n_chars / n_tokens if n_tokens else float("nan")}
    return report


def format_chars_per_token(report: dict[str, dict], tokenizer: Tokenizer, split: str) -> str:
    lines = [f"characters per token, built-in {split!r} split, {tokenizer!r}",
             "| lang | documents | characters | tokens | chars/token |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for lang, r in report.items():
        lines.append(f"| {lang} | {r['documents']:,} | {r['characters']:,} | {r['tokens']:,} "
                     f"| {r['chars_per_token']:.3f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m geb_jax.data.tokenizer --report [--vocab N | --model FILE] [--split S]`."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m geb_jax.data.tokenizer",
                                     description="Tokenizer utilities.")
    parser.add_argument("--report", action="store_true",
                        help="print characters per token on the built-in corpus per language")
    parser.add_argument("--vocab", type=int, default=GEB_VOCAB_SIZE,
                        help="vocabulary of the built-in tokenizer (trained and cached if new)")
    parser.add_argument("--model", default="", help="a tokenizer .model file instead")
    parser.add_argument("--split", default="valid", choices=("train", "valid"))
    args = parser.parse_args(argv)
    if not args.report:
        parser.error("nothing to do: pass --report")
    try:
        tok = Tokenizer.load(args.model) if args.model else builtin_tokenizer(args.vocab)
    except (OSError, TokenizerError, ValueError) as e:
        print(f"error: {e}")
        return 2
    print(format_chars_per_token(chars_per_token_report(tok, args.split), tok, args.split))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
