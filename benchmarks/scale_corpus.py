"""FineWeb-Edu sample-10BT's shape at any size: Hub-named parquet files of real English paragraphs recombined.
Each row group is a pure function of (file, row group) and a fixed paragraph pool, so files are streamed in
bounded memory and the same arguments give the same bytes; the price is that the text only has the pool's variety."""
from __future__ import annotations

import hashlib
import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline_corpus import ROOT, _candidates, _read_text  # noqa: E402

SAMPLE = ROOT / "data" / "sample"
SCHEMA = pa.schema([("text", pa.string()), ("id", pa.string()), ("dump", pa.string()), ("url", pa.string()),
                    ("file_path", pa.string()), ("language", pa.string()), ("language_score", pa.float64()),
                    ("score", pa.float64()), ("token_count", pa.int64()), ("int_score", pa.int64())])
# Common Crawl dumps FineWeb-Edu draws from (a real subset of their names)
DUMPS = [f"CC-MAIN-{y}-{w:02d}" for y, ws in (
    (2013, (20, 48)), (2014, (10, 15, 23, 35, 41, 42, 49, 52)), (2015, (6, 11, 14, 18, 22, 27, 32, 35, 40, 48)),
    (2016, (7, 18, 22, 26, 30, 36, 40, 44, 50)), (2017, (4, 9, 13, 17, 22, 26, 30, 34, 39, 43, 47, 51)),
    (2018, (5, 9, 13, 17, 22, 26, 30, 34, 39, 43, 47, 51)), (2019, (4, 9, 13, 18, 22, 26, 30, 35, 39, 43, 47, 51)),
    (2020, (5, 10, 16, 24, 29, 34, 40, 45, 50)), (2021, (4, 10, 17, 21, 25, 31, 39, 43, 49)),
    (2022, (5, 21, 27, 33, 40, 49)), (2023, (6, 14, 23, 40, 50)), (2024, (10,))) for w in ws]
TLDS = ["com", "org", "edu", "net", "gov", "co.uk", "info", "ac.uk", "org.au", "ca"]
_PARA = re.compile(r"\n[ \t]*\n")
_WS = re.compile(r"\s+")
_NOT_PROSE = re.compile(r'"""|\bself\.|\bdef |\bimport |[{}<>|\\]|^[#*>.\-=]|\(\)|==')
_PROSE_CHARS = re.compile(r"[A-Za-z ,.;:'()-]")


@dataclass(frozen=True)
class Spec:
    """What a generated subset looks like; every field changes the bytes."""
    docs_per_file: int = 690_000
    row_group: int = 16_384
    median_bytes: float = 3000.0     # FineWeb-Edu's median document
    sigma: float = 0.92              # log-normal spread: mean ~4.6 kB, as 3.2 GB / 690k documents
    min_bytes: int = 200
    max_bytes: int = 100_000
    dup_share: float = 0.003         # cross-file duplicates per file after the first
    seed: int = 10_000_000_000

    def n_dups(self, file_idx: int) -> int:
        return 0 if file_idx == 0 else max(2, round(self.dup_share * self.docs_per_file))

    def head(self) -> int:
        """Rows [0, head) are the duplicates' sources for the next file and never hold a planted copy."""
        return max(self.n_dups(1), min(self.row_group, self.docs_per_file // 2))


# ---------------------------------------------------------------- the paragraph pool

def paragraphs(texts: Iterable[str]) -> list[str]:
    """Prose paragraphs (one line each, 80 B - 4 kB, mostly letters, not code or markup), each once."""
    seen, out = set(), []
    for t in texts:
        for para in _PARA.split(t.replace("\\-", "-")):
            s = _WS.sub(" ", para).strip()
            n = len(s.encode())
            if not 80 <= n <= 4000 or s.count(" ") < 12 or _NOT_PROSE.search(s):
                continue
            if len(_PROSE_CHARS.findall(s)) < 0.93 * len(s):
                continue
            h = hashlib.blake2b(s.encode(), digest_size=12).digest()
            if h not in seen:
                seen.add(h)
                out.append(s)
    return out


def sample_texts() -> Iterable[str]:
    for p in sorted(SAMPLE.glob("*.parquet")):
        yield from pq.read_table(p, columns=["text"])["text"].to_pylist()


def machine_texts() -> Iterable[str]:
    """The bundled sample, then this machine's documentation and docstrings, in a fixed order."""
    yield from sample_texts()
    for _, p in _candidates():
        t = _read_text(p)
        if t:
            yield t


def load_pool(cache: Path) -> pa.Array:
    """The machine's paragraph pool, built once into `cache` (a parquet file)."""
    if not cache.exists():
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.tmp")
        pq.write_table(pa.table({"text": paragraphs(machine_texts())}), tmp, compression="zstd")
        tmp.replace(cache)
    return pq.read_table(cache)["text"].combine_chunks()


def pool_digest(pool: pa.Array) -> str:
    h = hashlib.sha256()
    for buf in pool.buffers()[1:]:
        h.update(memoryview(buf))
    return h.hexdigest()[:16]


def vocabulary(pool: pa.Array, n_paras: int = 4000) -> pa.Array:
    """Lowercase words of 4-10 letters from the pool's first paragraphs: the parts of URLs."""
    words = pc.list_flatten(pc.utf8_split_whitespace(pc.utf8_lower(pool.slice(0, n_paras))))
    words = pc.unique(words.filter(pc.match_substring_regex(words, r"^[a-z]{4,10}$")))
    return pa.array(sorted(words.to_pylist()))


# ---------------------------------------------------------------- one row group

def _texts(pool: pa.Array, lengths: np.ndarray, rng: np.random.Generator, start: int, file_idx: int) -> pa.Array:
    """Each document: consecutive draws from a stream of random paragraphs, cut where the running total
    passes the running target (errors do not accumulate), at least one paragraph, then its own line
    naming (file, row) so no two documents are equal unless planted."""
    plen = pc.binary_length(pool).to_numpy().astype(np.int64) + 2
    want = int(lengths.sum())
    idx = np.empty(0, np.int64)
    while True:
        more = rng.integers(0, len(pool), size=max(1024, int(1.2 * want / plen.mean())))
        idx = np.concatenate([idx, more])
        cum = np.cumsum(plen[idx])
        if cum[-1] >= want + plen.max():
            break
    cuts = np.searchsorted(cum, np.cumsum(lengths), side="left") + 1
    n = np.arange(1, len(cuts) + 1)
    cuts = np.maximum.accumulate(cuts - n) + n       # strictly increasing: every document >= 1 paragraph
    offsets = pa.array(np.concatenate([[0], cuts]).astype(np.int32))
    body = pc.binary_join(pa.ListArray.from_arrays(offsets, pool.take(pa.array(idx[:cuts[-1]]))), "\n\n")
    rows = pc.cast(pa.array(np.arange(start, start + len(lengths)) + file_idx * 10_000_000), pa.string())
    return pc.binary_join_element_wise(body, pc.binary_join_element_wise("Catalogue entry ", rows, ""), "\n\n")


def _ids(rng: np.random.Generator, n: int) -> pa.Array:
    raw = rng.bytes(16 * n).hex()
    return pa.array([f"<urn:uuid:{raw[i:i + 8]}-{raw[i + 8:i + 12]}-{raw[i + 12:i + 16]}-{raw[i + 16:i + 20]}-"
                     f"{raw[i + 20:i + 32]}>" for i in range(0, 32 * n, 32)])


def _urls(words: pa.Array, rng: np.random.Generator, n: int) -> pa.Array:
    """Few big sites, many small ones (a Zipf draw over word-pair domains); paths of three words."""
    w = len(words)
    site = np.minimum(rng.zipf(1.2, n) - 1, w * w - 1)
    a, b = site % w, (site * 2_654_435_761 + 12_345) // 7 % w
    tld = pa.array(TLDS).take(pa.array(site % len(TLDS)))
    host = pc.binary_join_element_wise(words.take(pa.array(a)), words.take(pa.array(b)), "")
    host = pc.binary_join_element_wise("https://www.", host, ".", tld, "")
    path = [words.take(pa.array(rng.integers(0, w, n))) for _ in range(3)]
    return pc.binary_join_element_wise(host, "/", path[0], "/", pc.binary_join_element_wise(*path[1:], "-"), "")


def row_group(pool: pa.Array, words: pa.Array, spec: Spec, file_idx: int, rg_idx: int) -> pa.Table:
    """Rows [rg_idx * spec.row_group, ...) of file `file_idx`, before any planted duplicate."""
    start = rg_idx * spec.row_group
    n = min(spec.row_group, spec.docs_per_file - start)
    rng = np.random.default_rng([spec.seed, file_idx, rg_idx])
    lengths = np.clip(rng.lognormal(np.log(spec.median_bytes), spec.sigma, n), spec.min_bytes, spec.max_bytes)
    text = _texts(pool, lengths.astype(np.int64), rng, start, file_idx)
    dump_i = rng.integers(0, len(DUMPS), n)
    dump = pa.array(DUMPS).take(pa.array(dump_i))
    seg = pc.cast(pa.array(1_368_696_381_249 + dump_i * 1_000_003 + rng.integers(0, 100, n)), pa.string())
    warc = pc.cast(pa.array(rng.integers(0, 80_000, n) % 640 + 10_000), pa.string())
    file_path = pc.binary_join_element_wise("s3://commoncrawl/crawl-data/", dump, "/segments/", seg, "/warc/",
                                            dump, "-", seg, "-", warc, ".warc.gz", "")
    score = 2.5 + 1e-3 + np.minimum(rng.gamma(1.4, 0.45, n), 2.6)
    nbytes = pc.binary_length(text).to_numpy()
    return pa.table([text, _ids(rng, n), dump, _urls(words, rng, n), file_path, pa.array(["en"] * n),
                     pa.array(np.round(0.65 + 0.35 * rng.beta(6.0, 1.0, n), 6)), pa.array(np.round(score, 6)),
                     pa.array((nbytes / 4.4).astype(np.int64) + 1),
                     pa.array(np.clip(np.rint(score), 3, 5).astype(np.int64))], schema=SCHEMA)


# ---------------------------------------------------------------- cross-file duplicates and whole files

def _plan_dups(spec: Spec, file_idx: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(positions in this file, source rows in the previous file's head, how many keep the id):
    the first `n_id` copies are whole rows (same id), the rest the same text under this row's id."""
    n = spec.n_dups(file_idx)
    if not n:
        return np.empty(0, np.int64), np.empty(0, np.int64), 0
    rng = np.random.default_rng([spec.seed, file_idx, 1 << 40])
    head = spec.head()
    if spec.docs_per_file - head < n:
        raise ValueError(f"--docs-per-file {spec.docs_per_file}: too few documents to plant {n} duplicates")
    pos = np.sort(rng.choice(np.arange(head, spec.docs_per_file), n, replace=False))
    src = rng.choice(head, n, replace=False)
    return pos, src, n // 2


def _plant(t: pa.Table, start: int, dups: tuple[np.ndarray, np.ndarray, int], sources: pa.Table) -> pa.Table:
    pos, src, n_id = dups
    sel = (pos >= start) & (pos < start + t.num_rows)
    if not sel.any():
        return t
    local, j = pos[sel] - start, np.flatnonzero(sel)
    extra = sources.take(pa.array(src[j]))
    base = np.arange(t.num_rows)
    whole, text_only = base.copy(), base.copy()
    text_only[local] = t.num_rows + np.arange(len(j))
    whole[local[j < n_id]] = t.num_rows + np.flatnonzero(j < n_id)
    cols = []
    for name in t.column_names:
        idx = text_only if name in ("text", "token_count") else whole
        cols.append(pa.concat_arrays([t[name].combine_chunks(), extra[name].combine_chunks()]).take(pa.array(idx)))
    return pa.table(cols, schema=SCHEMA)


def file_name(file_idx: int) -> str:
    return f"{file_idx:03d}_00000.parquet"


def write_file(out: Path, pool: pa.Array, spec: Spec, file_idx: int, progress=None) -> tuple[Path, int]:
    """File `file_idx`, atomically (a temp name, then renamed), snappy as the Hub's files; its text bytes."""
    from storage.atomic import atomic_open

    words = vocabulary(pool)
    dups = _plan_dups(spec, file_idx)
    sources = None
    if len(dups[0]):
        head = pa.concat_tables([row_group(pool, words, spec, file_idx - 1, g)
                                 for g in range(-(-spec.head() // spec.row_group))])
        sources = head.slice(0, spec.head())
    final, text_bytes = out / file_name(file_idx), 0
    with atomic_open(final) as f, pq.ParquetWriter(f, SCHEMA, compression="snappy",
                                                  use_dictionary=["dump", "language", "file_path"]) as w:
        for g in range(-(-spec.docs_per_file // spec.row_group)):
            t = row_group(pool, words, spec, file_idx, g)
            t = _plant(t, g * spec.row_group, dups, sources) if sources is not None else t
            w.write_table(t)
            text_bytes += pc.sum(pc.binary_length(t["text"])).as_py()
            if progress:
                progress(file_idx, min((g + 1) * spec.row_group, spec.docs_per_file))
    return final, text_bytes


def expected_counts(spec: Spec, n_files: int) -> dict:
    dups = sum(spec.n_dups(i) for i in range(n_files))
    return dict(docs=spec.docs_per_file * n_files, planted_dups=dups, kept=spec.docs_per_file * n_files - dups)


def describe(spec: Spec, pool: pa.Array, n_files: int) -> dict:
    """What `GENERATED.json` records: a folder with the same record need not be written again."""
    return dict(spec=asdict(spec), pool_sha256=pool_digest(pool), pool_paragraphs=len(pool), files=n_files,
                **expected_counts(spec, n_files))


def same_generation(out: Path, record: dict) -> bool:
    try:
        old = json.loads((out / "GENERATED.json").read_text())
    except (OSError, ValueError):
        return False
    return {k: v for k, v in old.items() if k != "files"} == {k: v for k, v in record.items() if k != "files"}
