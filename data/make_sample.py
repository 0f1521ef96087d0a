"""Build the bundled sample: Python standard-library documentation in FineWeb-Edu's schema.
Deterministic (same Python version → same bytes); metadata columns are synthetic, see README."""
from __future__ import annotations

import hashlib
import importlib
import inspect
import sys
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

OUT = Path(__file__).parent / "sample"
DUMPS = ["CC-MAIN-2024-10", "CC-MAIN-2024-18", "CC-MAIN-2024-22", "CC-MAIN-2023-50"]
SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3",
        "ensurepip", "venv", "pydoc_data", "__main__", "__phello__", "__hello__"}
MIN_CHARS = 200
MAX_DOCS = 3600


def _h(s: str) -> int:
    return int.from_bytes(hashlib.sha256(s.encode()).digest()[:8], "little")


THIRD_PARTY = {  # module -> documentation base URL; all BSD-3-Clause (see data/sample/README.md)
    "numpy": "https://numpy.org/doc/stable/reference/generated/",
    "numpy.linalg": "https://numpy.org/doc/stable/reference/generated/",
    "numpy.fft": "https://numpy.org/doc/stable/reference/generated/",
    "numpy.random": "https://numpy.org/doc/stable/reference/random/generated/",
    "numpy.polynomial.polynomial": "https://numpy.org/doc/stable/reference/generated/",
    "numpy.ma": "https://numpy.org/doc/stable/reference/generated/",
    "torch": "https://pytorch.org/docs/stable/generated/",
    "torch.nn": "https://pytorch.org/docs/stable/generated/",
    "torch.nn.functional": "https://pytorch.org/docs/stable/generated/",
    "torch.optim": "https://pytorch.org/docs/stable/generated/",
    "torch.linalg": "https://pytorch.org/docs/stable/generated/",
    "torch.distributions": "https://pytorch.org/docs/stable/distributions.html#",
}


def third_party() -> list[tuple[str, str]]:
    docs, seen = [], set()
    for name, base in THIRD_PARTY.items():
        mod = importlib.import_module(name)
        for attr, obj in sorted(vars(mod).items()):
            if attr.startswith("_") or id(obj) in seen or not callable(obj):
                continue
            seen.add(id(obj))
            d = inspect.getdoc(obj)
            if d and len(d) >= MIN_CHARS:
                docs.append((f"{base}{name}.{attr}.html", f"{name}.{attr}\n\n{d}"))
    return docs


def documents() -> list[tuple[str, str]]:
    """(url, text) pairs: reference topics, then one document per documented module/class/function."""
    from pydoc_data.topics import topics
    docs = [(f"https://docs.python.org/3/reference/{k}.html", v.strip()) for k, v in sorted(topics.items())]
    names = sorted(sys.stdlib_module_names)
    for name in names:
        if name.startswith("_") or name in SKIP:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                mod = importlib.import_module(name)
            except Exception:
                continue
        base = f"https://docs.python.org/3/library/{name}.html"
        if (d := inspect.getdoc(mod)) and len(d) >= MIN_CHARS:
            docs.append((base, d))
        for attr, obj in sorted(vars(mod).items()):
            if attr.startswith("_") or getattr(obj, "__module__", None) != name:
                continue
            if not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            d = inspect.getdoc(obj)
            if d and len(d) >= MIN_CHARS:
                docs.append((f"{base}#{name}.{attr}", f"{name}.{attr}\n\n{d}"))
            if inspect.isclass(obj):
                for meth, fn in sorted(vars(obj).items()):
                    d = None if meth.startswith("_") else inspect.getdoc(fn)
                    if d and len(d) >= MIN_CHARS and callable(fn):
                        docs.append((f"{base}#{name}.{attr}.{meth}", f"{name}.{attr}.{meth}\n\n{d}"))
    return docs + third_party()


def rows(docs: list[tuple[str, str]]) -> list[dict]:
    out = []
    for url, text in docs:
        h = _h(url)
        int_score = [2, 3, 3, 3, 4, 4, 5, 2][h % 8]
        score = int_score + ((h >> 8) % 100) / 100 - 0.5
        out.append(dict(text=text, id=f"<urn:uuid:{hashlib.md5(url.encode()).hexdigest()}>",
                        dump=DUMPS[(h >> 16) % len(DUMPS)], url=url,
                        file_path=f"s3://commoncrawl/crawl-data/{DUMPS[(h >> 16) % len(DUMPS)]}/sample.warc.gz",
                        language="en", language_score=0.80 + ((h >> 24) % 20) / 100, score=score,
                        token_count=len(text) // 4, int_score=int_score))
    return out


def main() -> None:
    docs = rows(documents())
    # keep the sample under 5 MB: cap at the first N documents in a stable order
    docs = docs[:MAX_DOCS]
    half = len(docs) // 2
    files = [docs[:half], docs[half:]]
    # a few exact duplicates across files (same id; same text under a new id), as crawls contain
    files[1] += [dict(d) for d in files[0][:20]]
    files[1] += [dict(d, id=d["id"][:-1] + "f>") for d in files[0][20:40]]
    OUT.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("text", pa.string()), ("id", pa.string()), ("dump", pa.string()),
                        ("url", pa.string()), ("file_path", pa.string()), ("language", pa.string()),
                        ("language_score", pa.float64()), ("score", pa.float64()),
                        ("token_count", pa.int64()), ("int_score", pa.int64())])
    for i, part in enumerate(files):
        t = pa.Table.from_pylist(part, schema=schema)
        pq.write_table(t, OUT / f"{i:03d}_00000.parquet", compression="zstd", row_group_size=500)
        print(f"{i:03d}_00000.parquet: {t.num_rows} documents")
    # the manifest `make demo` checks the files against (`--manifest`), in sha256sum's format
    (OUT / "SHA256SUMS").write_text("".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n"
                                            for p in sorted(OUT.glob("*.parquet"))))


if __name__ == "__main__":
    main()
