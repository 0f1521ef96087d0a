"""The pipeline benchmark's input: >= 100 MB of real text from this machine in FineWeb-Edu's schema, its tokenizer,
and that tokenizer as tiktoken ranks for the baseline. Cached under benchmarks/out/: built once, the same bytes after."""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks" / "out"
MAX_DOC = 50_000           # bytes per document
N_FILES = 4
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


# ---------------------------------------------------------------- corpus: real text from this machine

def _candidates() -> list[tuple[str, Path]]:
    """(kind, path) of every text-ish file we may use, sorted so the corpus is the same on every run."""
    site = Path(sys.prefix) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    roots = [("py", site), ("py", Path("/usr/lib/python3")),
             ("py", Path(f"/usr/lib/python{sys.version_info[0]}.{sys.version_info[1]}"))]
    out: list[tuple[str, Path]] = []
    for kind, root in roots:
        if root.is_dir():
            for p in root.rglob("*"):
                if p.suffix in (".py", ".md", ".rst", ".txt") and p.is_file():
                    out.append(("docs" if p.suffix != ".py" else kind, p))
    for kind, root in (("doc", Path("/usr/share/doc")), ("man", Path("/usr/share/man"))):
        if root.is_dir():
            out += [(kind, p) for p in root.rglob("*.gz") if p.is_file()]
    return sorted(set(out), key=lambda kp: str(kp[1]))


def _read_text(p: Path) -> str | None:
    try:
        if p.stat().st_size > 4 << 20:
            return None
        raw = p.read_bytes()
        if p.suffix == ".gz":
            raw = gzip.decompress(raw)
        if b"\x00" in raw:
            return None  # binary: not the text the pipeline is for
        return raw.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
        return None


def _chunks(text: str) -> list[str]:
    """Line-aligned pieces of at most MAX_DOC UTF-8 bytes (a longer line is cut by characters)."""
    out, cur, size = [], [], 0
    for line in text.splitlines(keepends=True):
        b = len(line.encode())
        while b > MAX_DOC:  # rare: minified files
            head, line = line[:MAX_DOC // 4], line[MAX_DOC // 4:]
            out.append(head)
            b = len(line.encode())
        if size + b > MAX_DOC and cur:
            out.append("".join(cur))
            cur, size = [], 0
        cur.append(line)
        size += b
    if cur:
        out.append("".join(cur))
    return [c for c in out if c.strip()]


def build_corpus(target_mb: int) -> tuple[Path, Path]:
    """`corpus_N/` (N_FILES parquet files) and `big_N/` (the same documents as one file), cached."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    small, big = OUT / f"corpus_{target_mb}", OUT / f"big_{target_mb}"
    if (small / "MANIFEST.json").exists() and (big / "MANIFEST.json").exists():
        return small, big
    t0 = time.time()
    docs, seen, total = [], set(), 0
    for kind, p in _candidates():
        text = _read_text(p)
        if not text:
            continue
        for k, c in enumerate(_chunks(text)):
            h = hashlib.blake2b(c.encode(), digest_size=16).digest()
            if h in seen:
                continue  # identical licence files etc.: the pipeline would drop them, the baseline not
            seen.add(h)
            docs.append((kind, f"{p}#{k}", c))
            total += len(c.encode())
    # every file gets a mix of kinds (the tokenizer samples the head of each file); fixed seed: same order always
    random.Random(20240520).shuffle(docs)
    budget, acc, cut = target_mb * 10**6, 0, 0
    for cut, (_, _, c) in enumerate(docs, 1):
        acc += len(c.encode())
        if acc >= budget:
            break
    if acc < budget:
        raise SystemExit(f"only {acc / 1e6:.0f} MB of text found here, {target_mb} MB asked")
    docs = docs[:cut]
    rng = random.Random(3)

    def table(rows):
        n = len(rows)
        return pa.table({
            "text": [c for _, _, c in rows],
            "id": [f"<urn:uuid:{hashlib.md5(src.encode()).hexdigest()}>" for _, src, _ in rows],
            "dump": [f"LOCAL-{kind.upper()}" for kind, _, _ in rows],
            "url": [f"file://{src}" for _, src, _ in rows],
            "file_path": [src.split("#")[0] for _, src, _ in rows],
            "language": ["en"] * n,
            "language_score": pa.array([round(rng.uniform(0.6, 1.0), 4) for _ in range(n)], pa.float64()),
            "token_count": pa.array([len(c) // 4 for _, _, c in rows], pa.int64()),
            "score": pa.array([round(rng.uniform(2.6, 4.9), 4) for _ in range(n)], pa.float64()),
            "int_score": pa.array([rng.choice((3, 3, 4, 5)) for _ in range(n)], pa.int64()),
        })
    for d in (small, big):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    per = -(-len(docs) // N_FILES)
    for i in range(N_FILES):
        pq.write_table(table(docs[i * per:(i + 1) * per]), small / f"{i:03d}_00000.parquet", row_group_size=2048)
    pq.write_table(table(docs), big / "000_00000.parquet", row_group_size=2048)
    man = dict(docs=len(docs), text_bytes=acc, files=N_FILES, built_s=round(time.time() - t0, 1))
    for d in (small, big):
        (d / "MANIFEST.json").write_text(json.dumps(man))
    return small, big


def parquet_files(d: Path) -> list[Path]:
    return sorted(d.glob("*.parquet"))


def read_texts(d: Path) -> list[str]:
    import pyarrow.parquet as pq
    return [s for f in parquet_files(d) for s in pq.read_table(f, columns=["text"])["text"].to_pylist()]


# ---------------------------------------------------------------- tokenizer and its tiktoken twin

def train_once(corpus: Path) -> Path:
    from storage.sources import list_local
    from tasks.filter import FilterConfig
    from tasks.tokenizer import TokenizerConfig, train_tokenizer, training_texts

    out = OUT / f"tokenizer_{corpus.name}.json"
    if not out.exists():
        t0 = time.time()
        train_tokenizer(training_texts(list_local(corpus), FilterConfig(), TokenizerConfig()), out, TokenizerConfig())
        print(f"trained tokenizer in {time.time() - t0:.1f} s -> {out}", flush=True)
    return out


def tiktoken_from(tok_json: Path):
    """Our byte-level BPE as a tiktoken Encoding: vocab strings back to bytes (GPT-2's bytes_to_unicode), rank = id."""
    import tiktoken

    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    byte_of = {chr(c): b for b, c in zip(bs, cs)}
    model = json.loads(tok_json.read_text())
    special = {t["content"]: t["id"] for t in model["added_tokens"]}
    ranks = {bytes(byte_of[ch] for ch in s): i for s, i in model["model"]["vocab"].items() if s not in special}
    return tiktoken.Encoding("langpwt", pat_str=GPT2_SPLIT, mergeable_ranks=ranks, special_tokens=special)


def verify_ids(corpus: Path, tok_json: Path, n: int) -> int:
    """Baseline and ours must agree id for id, or the comparison means nothing."""
    from tasks.tokenizer import Encoder

    texts = read_texts(corpus)[:n]
    enc, tk = Encoder(tok_json), tiktoken_from(tok_json)
    ids, offs = enc.encode_flat(texts)
    for k, t in enumerate(texts):
        mine = ids[offs[k]:offs[k + 1]].tolist()
        if tk.encode_ordinary(t) != mine:
            raise SystemExit(f"ABORT: tiktoken ids differ from Encoder's on document {k}: the baseline is not comparable")
    return len(texts)


def build_big4(big: Path) -> Path:
    """`big` four times over in one file, each copy's texts and ids made distinct (nothing is dropped):
    peak RSS on 1x and 4x shows whether memory grows with the size of one source file. Cached."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    out = OUT / f"{big.name}_x4"
    dest = out / "000_00000.parquet"
    if dest.exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    t = pq.read_table(big / "000_00000.parquet")
    tmp = dest.with_suffix(".tmp")
    with pq.ParquetWriter(tmp, t.schema, compression="zstd") as w:
        for k in range(4):
            n = t.num_rows
            c = t.set_column(t.schema.get_field_index("text"), "text",
                             pc.binary_join_element_wise(pa.array([f"copy {k}\n"] * n), t["text"], ""))
            c = c.set_column(c.schema.get_field_index("id"), "id",
                             pc.binary_join_element_wise(c["id"], pa.array([f"-{k}"] * n), ""))
            w.write_table(c, row_group_size=2048)
    os.replace(tmp, dest)
    return out
