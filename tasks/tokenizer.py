"""Train a byte-level BPE on a bounded sample of filtered text, and load a fast encoder for it.
fastokens reads the same tokenizer.json and gives identical ids; it refuses vocabularies with very long
tokens, so `tokenizers` stays as the fallback encoder (and the decoder)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import polars as pl

from storage.atomic import atomic_write_bytes, atomic_write_text
from storage.shards import file_sha256
from storage.sources import SourceFile
from tasks.filter import FilterConfig, rule_reason
from tasks.params import DEFAULT_VOCAB
from tasks.read import iter_batches

EOT = "<|endoftext|>"
# Text per encoder call: slices of a few MB keep fastokens' working set in cache; the pipeline's read
# batches stay large for Polars' sake.
ENCODE_CHARS = 4_000_000


@dataclass(frozen=True)
class TokenizerConfig:
    vocab_size: int = DEFAULT_VOCAB
    sample_bytes: int = 48 * 2**20  # RAM of the BPE trainer grows fast with its input
    max_doc_chars: int = 20_000
    min_frequency: int = 2
    max_token_length: int = 32  # fastokens refuses vocabularies with very long tokens


def training_texts(sources: list[SourceFile], fcfg: FilterConfig, tcfg: TokenizerConfig) -> Iterator[str]:
    """Documents that pass the rules, in file order, each cut to max_doc_chars, until sample_bytes.

    File order (not a share of every file) lets training start once the first files are in."""
    budget, used = tcfg.sample_bytes, 0
    for src in sources:
        for t in iter_batches(src.path, ["id", "text", "int_score", "language_score", "dump"]):
            df = pl.from_arrow(t).filter(rule_reason(fcfg).is_null())
            for text in df["text"].str.slice(0, tcfg.max_doc_chars):
                yield text
                used += len(text.encode("utf-8"))
                if used >= budget:
                    return


def train_tokenizer(texts: Iterator[str], out: Path, cfg: TokenizerConfig) -> str:
    """Train, save `out` atomically, return its sha256. No normaliser: decoding is byte-exact."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency, special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), max_token_length=cfg.max_token_length,
        show_progress=False)
    tok.train_from_iterator(texts, trainer)
    atomic_write_text(out, tok.to_str(pretty=False))
    atomic_write_text(out.with_suffix(".config.json"), json.dumps(asdict(cfg), indent=2))
    return file_sha256(out)


class Encoder:
    """Encodes batches of texts to one flat uint32 buffer; special-token text is encoded as text.

    `tokenizers` is loaded only where needed (decoding, or as the fallback encoder): with fastokens
    it would double the load time of every shard task for nothing."""

    def __init__(self, path: str | Path, backend: str = "auto"):
        self.path = Path(path)
        self._ref = None
        self.fast = None
        if backend in ("auto", "fastokens"):
            try:
                self.fast = _load_fast(self.path)
            except Exception:
                if backend == "fastokens":
                    raise
        self.backend = "fastokens" if self.fast is not None else "tokenizers"
        src = self.fast if self.fast is not None else self.ref
        eot = src.token_to_id(EOT)
        if eot is None:
            raise ValueError(f"{self.path}: tokenizer has no {EOT} token")
        self.eot = eot
        self.vocab_size = self.fast.vocab_size if self.fast is not None else self.ref.get_vocab_size()

    @classmethod
    def cached(cls, path: str | Path, sha256: str) -> "Encoder":
        """One encoder per tokenizer per process: shard tasks in one worker share it (it is thread-safe).
        Keyed by content: a given file and its copy in the home are one tokenizer, loaded once."""
        with _CACHE_LOCK:
            if sha256 not in _CACHE:
                _CACHE.clear()
                _CACHE[sha256] = cls(path)
            return _CACHE[sha256]

    @classmethod
    def preload(cls, path: str | Path, sha256: str) -> None:
        """Start `cached` on a thread: loading is the longest fixed cost of a run, and the
        first reads and catalog writes can overlap it. A failure is left to the next `cached` call to raise."""
        if sha256 in _CACHE:
            return

        def load() -> None:
            with contextlib.suppress(Exception):
                cls.cached(path, sha256)

        threading.Thread(target=load, name="tokenizer-load", daemon=True).start()

    @property
    def ref(self):
        if self._ref is None:
            from tokenizers import Tokenizer

            ref = Tokenizer.from_file(str(self.path))
            ref.encode_special_tokens = True  # "<|endoftext|>" inside a document is just text
            self._ref = ref
        return self._ref

    def encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids uint32, offsets uint64 of len(texts)+1)."""
        if self.fast is None:
            return self._encode_ref(texts)
        parts = [self._fast(texts[lo:hi], False) for lo, hi in _slices(texts)]
        if len(parts) == 1:
            return parts[0]
        ids = np.concatenate([p[0] for p in parts])
        offs = np.zeros(len(texts) + 1, np.uint64)
        at, base = 1, np.uint64(0)
        for p_ids, p_offs in parts:
            offs[at:at + p_offs.size - 1] = p_offs[1:] + base
            at += p_offs.size - 1
            base += np.uint64(p_ids.size)
        return ids, offs

    def encode_docs(self, texts: list[str], dtype) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Shard-ready slices: (tokens in `dtype` with `<|endoftext|>` before each document, int64
        offset of each document's EOT), a few MB of text at a time, in order.

        fastokens adds the EOT itself (a template post-processor), so no interleaving pass is needed."""
        for lo, hi in _slices(texts):
            if self.fast is not None:
                ids, offs = self._fast(texts[lo:hi], True)
                yield ids.astype(dtype), offs[:-1].astype(np.int64)
            else:
                ids, offs = self._encode_ref(texts[lo:hi])
                yield _interleave(ids, offs, self.eot, dtype)

    def _fast(self, texts: list[str], with_eot: bool) -> tuple[np.ndarray, np.ndarray]:
        ids, offs = self.fast.encode_batch_flat(texts, add_special_tokens=with_eot, split_special_tokens=True)
        return np.frombuffer(ids, np.uint32), np.frombuffer(offs, np.uint64)

    def _encode_ref(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        encs = self.ref.encode_batch(texts, add_special_tokens=False)
        lens = np.fromiter((len(e.ids) for e in encs), np.uint64, len(encs))
        offs = np.zeros(len(encs) + 1, np.uint64)
        np.cumsum(lens, out=offs[1:])
        ids = np.fromiter((i for e in encs for i in e.ids), np.uint32, int(offs[-1]))
        return ids, offs

    def decode(self, ids) -> str:
        return self.ref.decode([int(i) for i in ids], skip_special_tokens=False)


def _load_fast(path: Path):
    """fastokens on `path`, with a template that puts `<|endoftext|>` before a document when asked
    (add_special_tokens=True); plain encoding is unchanged. A post-processor the file may hold
    (GPT-2's ByteLevel one only trims offsets) is replaced, offsets are never used here."""
    import fastokens

    text = Path(path).read_text(encoding="utf-8")
    head, model = _split_model(text)
    spec = json.loads(head if model is not None else text)
    eot = next((t["id"] for t in spec.get("added_tokens") or [] if t.get("content") == EOT), None)
    if eot is None:
        return fastokens.Tokenizer.from_file(str(path))  # Encoder refuses it, naming the file
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": EOT, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {EOT: {"id": EOT, "ids": [eot], "tokens": [EOT]}}}
    body = json.dumps(spec)
    return fastokens.Tokenizer.from_json_str(body if model is None else body[:-1] + ',"model":' + model)


def _split_model(text: str) -> tuple[str, str | None]:
    """(the object without its top-level "model", the model's JSON and what follows it), or (text, None).

    The model (vocabulary and merges) is nearly all of the file and needs no change: parsing and
    re-serialising it in Python would hold the GIL on every load. `tokenizers` writes it last; keys after it travel
    untouched in the tail. A file whose post_processor or added_tokens come after it takes the full parse."""
    at = text.find('"model":')
    if at < 0:
        return text, None
    head = text[:at].rstrip()
    if not head.endswith(","):
        return text, None
    try:
        obj = json.loads(head[:-1] + "}")
    except ValueError:  # the first "model": was inside another value
        return text, None
    tail = text[at + len('"model":'):]
    if not isinstance(obj, dict) or "post_processor" not in obj or "added_tokens" not in obj \
            or not tail.rstrip().endswith("}"):
        return text, None
    return head[:-1] + "}", tail


def _slices(texts: list[str], chars: int = ENCODE_CHARS) -> list[tuple[int, int]]:
    """[lo, hi) ranges of about `chars` characters each (a longer document is a slice of its own)."""
    if not texts:
        return [(0, 0)]
    ends = np.cumsum(np.fromiter(map(len, texts), np.int64, len(texts)))
    cuts = np.searchsorted(ends, np.arange(chars, int(ends[-1]), chars), side="left") + 1
    bounds = np.unique(np.concatenate([[0], np.minimum(cuts, len(texts)), [len(texts)]]))
    return list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))


def _interleave(ids: np.ndarray, offs: np.ndarray, eot: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Tokens with `<|endoftext|>` before every document, and each document's EOT offset (the
    `tokenizers` fallback; fastokens adds the EOT itself)."""
    n = offs.size - 1
    starts = (offs[:-1] + np.arange(n, dtype=np.uint64)).astype(np.int64)
    out = np.empty(ids.size + n, dtype=dtype)
    is_tok = np.ones(out.size, dtype=bool)
    is_tok[starts] = False
    out[is_tok] = ids
    out[starts] = eot
    return out, starts


_CACHE: dict[str, Encoder] = {}
_CACHE_LOCK = threading.Lock()


def ready_sha256(home_tokenizer: Path, given: str | None = None) -> str:
    """sha256 of the tokenizer a run will use when `tokenizer_ready` said it needs no training: the
    given file's bytes (the home gets a copy of them) or the home's. No parse: the flow submits its
    scans with it at once and lets `ensure_tokenizer` check the file while they read."""
    path = _run_file(home_tokenizer, given)
    try:
        return file_sha256(path)
    except OSError as e:
        raise ValueError(f"--tokenizer {path}: not a readable tokenizer.json ({e})") from None


def preload_tokenizer(home_tokenizer: Path, given: str | None = None) -> None:
    """Start loading the tokenizer a run will use (a given file, else the home's) before anything needs it."""
    try:
        sha = ready_sha256(home_tokenizer, given)
    except ValueError:
        return  # ensure_tokenizer reports it, naming the file
    Encoder.preload(_run_file(home_tokenizer, given), sha)


def _run_file(home_tokenizer: Path, given: str | None) -> Path:
    return Path(given) if given else home_tokenizer


def tokenizer_ready(home_tokenizer: Path, given: str | None = None, retrain: bool = False) -> bool:
    """Whether `ensure_tokenizer` needs no training (a given file, or the home's own), so the flow can
    resolve it before any file is scanned."""
    return bool(given) or (home_tokenizer.exists() and not retrain)


def home_vocab(home_tokenizer: Path) -> int | None:
    """The vocabulary the home's tokenizer was trained for (its config), or None (none yet, or given)."""
    try:
        v = json.loads(home_tokenizer.with_suffix(".config.json").read_text()).get("vocab_size")
    except (OSError, ValueError, AttributeError):
        return None
    return v if isinstance(v, int) else None


def tokenizer_vocab(home_tokenizer: Path) -> int | None:
    """The home tokenizer's vocabulary: as trained for, else as its file holds it; None without one."""
    if not home_tokenizer.exists():
        return None
    if (v := home_vocab(home_tokenizer)) is not None:
        return v
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(home_tokenizer)).get_vocab_size()
    except Exception:  # not a tokenizer: the run reports it when it loads the file
        return None


def archive(home_tokenizer: Path) -> Path | None:
    """Keep the home's tokenizer (and its config) under archive/<sha256>.json before it is replaced:
    shards built with it stay decodable."""
    if not home_tokenizer.exists():
        return None
    data = home_tokenizer.read_bytes()
    out = home_tokenizer.parent / "archive" / f"{hashlib.sha256(data).hexdigest()}.json"
    if not out.exists():
        cfg = home_tokenizer.with_suffix(".config.json")
        if cfg.exists():
            atomic_write_bytes(out.with_suffix(".config.json"), cfg.read_bytes())
        atomic_write_bytes(out, data)
    return out


def resolve_tokenizer(home_tokenizer: Path, sources: list[SourceFile], fcfg: FilterConfig, tcfg: TokenizerConfig,
                      given: str | None = None, retrain: bool = False) -> tuple[str, str, int]:
    """(origin, sha256, vocab size) of the run's tokenizer (`ensure_tokenizer`), loaded once for this process."""
    origin, sha = ensure_tokenizer(home_tokenizer, sources, fcfg, tcfg, given, retrain)
    return origin, sha, Encoder.cached(home_tokenizer, sha).vocab_size


def ensure_tokenizer(home_tokenizer: Path, sources: list[SourceFile], fcfg: FilterConfig, tcfg: TokenizerConfig,
                     given: str | None = None, retrain: bool = False) -> tuple[str, str]:
    """Return (origin, sha256) of the home's tokenizer.json, training or copying it if needed.

    A given file is copied into the home so training and generation find it later, once it loads as a
    tokenizer with `<|endoftext|>` (the flow's preload has usually loaded it already: a JSON parse here
    would hold the GIL while the scans run). The home's tokenizer is part of its identity: it is reused
    unless `retrain` is set; a replaced one is archived first (`archive`)."""
    cfg_path = home_tokenizer.with_suffix(".config.json")
    if given:
        src = Path(given)
        try:
            data = src.read_bytes()
            sha = hashlib.sha256(data).hexdigest()
            Encoder.cached(src, sha)
        except Exception as e:  # fastokens and tokenizers raise their own types for a file that is not one
            raise ValueError(f"--tokenizer {given}: not a readable tokenizer.json ({e})") from None
        if not home_tokenizer.exists() or home_tokenizer.read_bytes() != data:
            archive(home_tokenizer)
            atomic_write_bytes(home_tokenizer, data)
            atomic_write_text(cfg_path, json.dumps({"given": str(src.resolve())}, indent=2))
        return f"given:{src.name}", sha
    if home_tokenizer.exists() and not retrain:
        return "trained", file_sha256(home_tokenizer)
    archive(home_tokenizer)
    return "trained", train_tokenizer(training_texts(sources, fcfg, tcfg), home_tokenizer, tcfg)
