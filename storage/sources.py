"""A source is a sorted list of parquet files, each with its size and sha256.
Local folders and Hub downloads both end as `SourceFile`s recorded in `source_files`."""
from __future__ import annotations

import datetime as dt
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, asdict
from pathlib import Path

from storage import catalog
from storage.hash_cache import HashCache
from storage.paths import Home
from storage.shards import file_sha256


COLUMNS = ["file", "position", "path", "size_bytes", "sha256", "status", "error", "dataset", "revision", "url",
           "downloaded_at", "seconds"]


@dataclass(frozen=True)
class SourceFile:
    file: str          # name relative to the source root, e.g. "sample/10BT/000_00000.parquet"
    path: str          # absolute local path
    size_bytes: int
    sha256: str
    position: int      # index in the sorted list: the shard id

    @property
    def shard_id(self) -> int:
        return self.position


def _listing(source_dir: str | Path, pattern: str) -> tuple[Path, dict[str, Path]]:
    root = Path(source_dir).expanduser().resolve()
    if not root.is_dir():
        raise NotADirectoryError(f"--source {source_dir}: not a directory")
    files = sorted(p for p in root.rglob(pattern) if p.is_file() and not p.name.startswith("."))
    return root, {str(p.relative_to(root)): p for p in files}


def _hash_all(paths: list[Path], cache: HashCache | None = None) -> list[str]:
    # hashlib drops the GIL: files hash in parallel on a few threads
    cache = cache or HashCache(None)
    known = {p: cache.lookup(p) for p in paths}
    todo = [p for p in paths if known[p] is None]
    with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:
        known.update(zip(todo, pool.map(lambda p: cache.hash(p, file_sha256), todo)))
    cache.save()
    return [known[p] for p in paths]


def list_local(source_dir: str | Path, pattern: str = "*.parquet", hashes: Path | None = None,
               rehash: bool = False) -> list[SourceFile]:
    """Every parquet file under `source_dir`, sorted by relative path, hashed; `hashes`: a `HashCache` file
    (the home's), so a file unchanged since an earlier run is not read again for its sha256; `rehash`: read
    every file anyway and refresh the cache."""
    _, files = _listing(source_dir, pattern)
    if not files:
        raise FileNotFoundError(f"--source {source_dir}: no files matching {pattern}")
    shas = _hash_all(list(files.values()), HashCache(hashes, trust=not rehash))
    return [SourceFile(rel, str(p), p.stat().st_size, sha, i)
            for i, ((rel, p), sha) in enumerate(zip(files.items(), shas))]


_SUM_LINE = re.compile(r"([0-9a-fA-F]{64}) [ *](.+)")


def read_manifest(path: str | Path) -> dict[str, tuple[str, int | None]]:
    """{file: (sha256, size or None)} from `sha256sum` output (`HEX  NAME` lines) or JSON: a list, or
    {"files": [...]}, of objects with `path` or `file`, `sha256` (or the Hub tree listing's `lfs.oid`) and
    optionally `size`/`size_bytes`; so a saved Hub listing works as it is."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--manifest {path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    out: dict[str, tuple[str, int | None]] = {}

    def add(name, sha, size, where: str) -> None:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"--manifest {path}: {where}: no file name")
        if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", sha):
            raise ValueError(f"--manifest {path}: {where}: no sha256 (64 hex digits)")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
            raise ValueError(f"--manifest {path}: {where}: size {size!r} is not a byte count")
        name = name.strip().removeprefix("./")
        if name in out and out[name][0] != sha.lower():
            raise ValueError(f"--manifest {path}: {name} is listed twice with different sha256")
        out[name] = (sha.lower(), size)

    if text.lstrip().startswith(("[", "{")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--manifest {path}: not valid JSON ({e.msg}, line {e.lineno})") from None
        items = data.get("files") if isinstance(data, dict) else data
        if not isinstance(items, list) or not all(isinstance(it, dict) for it in items):
            raise ValueError(f"--manifest {path}: expected a list of objects (or {{\"files\": [...]}})")
        for k, it in enumerate(items):
            if it.get("type") == "directory":
                continue
            lfs = it.get("lfs") if isinstance(it.get("lfs"), dict) else {}
            add(it.get("path", it.get("file")), it.get("sha256", lfs.get("oid")),
                it.get("size_bytes", it.get("size", lfs.get("size"))), f"entry {k}")
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip() and not line.startswith("#"):
                m = _SUM_LINE.fullmatch(line.rstrip("\r"))
                if m is None:
                    raise ValueError(f"--manifest {path}: line {n}: expected '<sha256>  <file>' as sha256sum writes it")
                add(m.group(2), m.group(1), None, f"line {n}")
    if not out:
        raise ValueError(f"--manifest {path}: lists no file")
    return out


def _match(expected: dict, local: dict[str, Path]) -> dict[str, str]:
    """local relative path -> the manifest name it answers: the same path, or the longest local path the
    name ends with (a manifest written from a parent folder)."""
    entry_of: dict[str, str] = {}
    for name in expected:
        rel = name if name in local else max((r for r in local if name.endswith("/" + r) and r not in entry_of),
                                             key=len, default=None)
        if rel is not None and rel not in entry_of:
            entry_of[rel] = name
    return entry_of


def _missing(expected: dict, entry_of: dict[str, str], local: dict[str, Path]) -> dict[str, str]:
    """Where each listed-but-absent file would lie (relative, as its matched siblings do) -> its manifest name."""
    prefixes = {entry_of[r][:len(entry_of[r]) - len(r)] for r in entry_of}
    prefix = prefixes.pop() if len(prefixes) == 1 else ""
    missing = {}
    for n in (n for n in expected if n not in entry_of.values()):
        short = n[len(prefix):] if prefix and n.startswith(prefix) else n
        missing[short if short not in local else n] = n
    return missing


def _judge(p: Path, rel: str, pos: int, size: int, got: str, entry: tuple[str, int | None] | None,
           manifest) -> tuple[SourceFile, str | None]:
    """One present file against its manifest entry (None: not listed): the file, and why it is refused."""
    if entry is None:
        return SourceFile(rel, str(p), size, got, pos), f"{p}: not listed in --manifest {manifest}"
    sha, want = entry
    if want is not None and size != want:
        return SourceFile(rel, str(p), size, sha, pos), f"{p}: {size:,} bytes, --manifest {manifest} says {want:,}"
    if got != sha:
        return (SourceFile(rel, str(p), size, sha, pos),
                f"{p}: sha256 {got} does not match --manifest {manifest} ({sha})")
    return SourceFile(rel, str(p), size, sha, pos), None


def list_verified(source_dir: str | Path, manifest: str | Path,
                  pattern: str = "*.parquet") -> tuple[list[SourceFile], list[tuple[SourceFile, str]]]:
    """`list_local` checked against a manifest: (files that match it, [(file, why) for the rest]). A file
    whose size or sha256 differs, one it does not list, and one it lists that is missing are refused, each
    with a one-line reason, to be recorded `failed` and never tokenized. Positions come from the sorted
    union of both, so a good file's shard id does not depend on whether a bad one is there. Manifest
    names match a file by its path under `source_dir`, or by a path ending in it (written from a parent
    folder, as the Hub names them: `sample/10BT/000_00000.parquet`)."""
    expected = read_manifest(manifest)
    root, local = _listing(source_dir, pattern)
    entry_of = _match(expected, local)
    missing = _missing(expected, entry_of, local)
    sizes = {r: p.stat().st_size for r, p in local.items()}
    # a file whose size already disagrees is refused without reading it
    to_hash = [r for r in local if r not in entry_of or expected[entry_of[r]][1] in (None, sizes[r])]
    shas = dict(zip(to_hash, _hash_all([local[r] for r in to_hash])))
    good, bad = [], []
    for pos, rel in enumerate(sorted(set(local) | set(missing))):
        if rel in missing:
            sha, size = expected[missing[rel]]
            bad.append((SourceFile(rel, str(root / rel), size or 0, sha, pos),
                        f"{root / rel}: listed in --manifest {manifest} but not in --source"))
            continue
        entry = expected[entry_of[rel]] if rel in entry_of else None
        f, why = _judge(local[rel], rel, pos, sizes[rel], shas.get(rel, ""), entry, manifest)
        if why:
            bad.append((f, why))
        else:
            good.append(f)
    return good, bad


def record(home: Home, files: list[SourceFile], status: str = "verified", *, dataset: str | None = None,
           revision: str | None = None, urls: dict[str, str] | None = None,
           seconds: dict[str, float] | None = None, errors: dict[str, str] | None = None) -> None:
    """Upsert the files' rows in `source_files` (one transaction)."""
    if not files:
        return
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    rows = [dict(asdict(f), status=status, error=(errors or {}).get(f.file), dataset=dataset, revision=revision,
                 url=(urls or {}).get(f.file), downloaded_at=now if urls and status == "verified" else None,
                 seconds=(seconds or {}).get(f.file)) for f in files]
    # bound parameters, not an Arrow table: pyarrow's first Python-object conversion imports pandas in
    # every process, and a source is a few files
    with catalog.writer(home) as con:
        con.execute("DELETE FROM source_files WHERE list_contains(?, file)", [[f.file for f in files]])
        con.executemany(f"INSERT INTO source_files ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                        [[r[c] for c in COLUMNS] for r in rows])


def mark(home: Home, file: str, status: str, error: str | None = None) -> None:
    with catalog.writer(home) as con:
        con.execute("UPDATE source_files SET status = ?, error = ? WHERE file = ?", [status, error, file])


def failed(home: Home) -> list[tuple[str, str | None]]:
    """(file, why) of the source files recorded `failed` (download or manifest verification), in shard order."""
    try:
        return catalog.query_rows(home, "SELECT file, error FROM source_files WHERE status = 'failed' ORDER BY position")
    except catalog.CatalogMissing:
        return []


def from_catalog(home: Home) -> list[SourceFile]:
    """The verified files recorded by an earlier download, in shard order (positions as recorded)."""
    try:
        rows = catalog.query_rows(home, """SELECT file, path, size_bytes, sha256, position FROM source_files
                                           WHERE status = 'verified' AND dataset IS NOT NULL ORDER BY position""")
    except catalog.CatalogMissing:
        return []
    return [SourceFile(*r) for r in rows if Path(r[1]).is_file()]
