"""Small real-text corpora for the fault suite, and what the pipeline must make of them.
The expected documents are computed here independently of the pipeline's own filter code."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from storage.paths import Home
from storage.shards import open_shard
from tasks.tokenizer import Encoder
from tests.conftest import sample_rows, write_parquet


def make_corpus(d: Path, n_files: int = 3, copies: int = 2, with_dups: bool = True) -> list[dict]:
    """Files of real text (the bundled sample, each copy with its own ids); returns all rows in order."""
    base = sample_rows()
    everything = []
    for f in range(n_files):
        rows = [dict(r, id=f"{r['id'][:-1]}-{f}-{c}>", text=f"Part {f}.{c}: {r['text']}")
                for c in range(copies) for r in base]
        if with_dups and f > 0:  # a few cross-file duplicates, by id and by text
            rows += [dict(everything[k]) for k in range(0, 30, 3)]
            rows += [dict(everything[k], id=f"<dup:{f}:{k}>") for k in range(1, 30, 3)]
        write_parquet(d / f"{f:03d}_00000.parquet", rows, row_group_size=300)
        everything += rows
    return everything


def expected_docs(rows: list[dict], min_int_score: int = 3) -> Counter:
    seen_id, seen_text, out = set(), set(), Counter()
    for r in rows:
        t = r["text"]
        if t is None or t == "" or (r["int_score"] if r["int_score"] is not None else -1) < min_int_score:
            continue
        dup = r["id"] in seen_id or t in seen_text
        seen_id.add(r["id"])
        seen_text.add(t)
        if not dup:
            out[t] += 1
    return out


def decoded_docs(home: Home) -> Counter:
    enc = Encoder(home.tokenizer)
    out = Counter()
    for p in sorted(home.shards.glob("*.bin")):
        s = open_shard(p)
        out.update(enc.ref.decode_batch([s.doc(k).tolist() for k in range(s.n_docs)], skip_special_tokens=False))
    return out


def token_counter(home: Home):
    enc = Encoder(home.tokenizer)
    return lambda text: int(enc.encode_flat([text])[1][-1])


def final_files_complete(home: Home) -> bool:
    """Every shard under its final name opens and matches its sidecar index."""
    for p in home.shards.glob("*.bin"):
        open_shard(p)
    return True


def shard_bytes(home: Home) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(home.shards.iterdir()) if not p.name.startswith(".")}
