"""HellaSwag's validation items: fetched once from the Hub into the home (verified, resumable), or read from a local
file, checked and preprocessed exactly as lm-evaluation-harness's `hellaswag` task does, so scores compare with it.
Items are held in memory (10,042 of them, a few MB): simple, and the scorer wants them all anyway."""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from storage.atomic import atomic_write_text
from storage.paths import Home
from storage.shards import file_sha256

DATASET = "Rowan/hellaswag"
# the repo's main branch holds a loading script; its data is served as parquet on the converter's branch
REVISION = "refs/convert/parquet"
PATTERN = "default/validation/*.parquet"
FIELDS = ("activity_label", "ctx_a", "ctx_b", "endings", "label")


class HellaSwagError(ValueError):
    """A HellaSwag file that cannot be used: one line naming it, the item and the reason."""


@dataclass(frozen=True)
class Item:
    context: str             # preprocessed "activity_label: ctx_a Ctx_b"
    endings: tuple[str, ...]  # preprocessed; each is scored as " " + ending after the context
    label: int


def preprocess(text: str) -> str:
    """The harness's cleanup: WikiHow's " [title]" becomes ". ", other bracketed text goes, then one pass turns
    each pair of spaces into one (three spaces leave two: the harness's exact rule)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _label(value, where: str, n: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().lstrip("-").isdigit():
        raise HellaSwagError(f"{where}: label {value!r} is not an integer")
    label = int(value)
    if not 0 <= label < n:
        raise HellaSwagError(f"{where}: label {label} out of range 0..{n - 1}")
    return label


def to_item(row: dict, where: str) -> Item:
    """One item from a row in the original schema (label an int) or the Hub's (label a string)."""
    if not isinstance(row, dict):
        raise HellaSwagError(f"{where}: expected an object with {', '.join(FIELDS)}")
    missing = [f for f in FIELDS if f not in row]
    if missing:
        raise HellaSwagError(f"{where}: missing field {missing[0]} (expected {', '.join(FIELDS)})")
    endings = row["endings"]
    if not isinstance(endings, (list, tuple)) or len(endings) < 2 or not all(isinstance(e, str) for e in endings):
        raise HellaSwagError(f"{where}: endings must be a list of at least two strings")
    for f in ("activity_label", "ctx_a", "ctx_b"):
        if not isinstance(row[f], str):
            raise HellaSwagError(f"{where}: {f} must be a string")
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return Item(preprocess(row["activity_label"] + ": " + ctx), tuple(preprocess(e) for e in endings),
                _label(row["label"], where, len(endings)))


def _rows(path: Path):
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield f"{path}: line {i}", json.loads(line)
                    except json.JSONDecodeError as e:
                        raise HellaSwagError(f"{path}: line {i}: not JSON ({e.msg})") from None
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several types for a file that is not parquet
            raise HellaSwagError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
        missing = [f for f in FIELDS if f not in table.column_names]
        if missing:
            raise HellaSwagError(f"{path}: missing column {missing[0]} (expected {', '.join(FIELDS)})")
        for i, row in enumerate(table.select(list(FIELDS)).to_pylist()):
            yield f"{path}: row {i}", row
    else:
        raise HellaSwagError(f"--hellaswag-data {path}: expected a .jsonl or .parquet file")


def read_items(path: str | Path, limit: int | None = None) -> list[Item]:
    """Every item of the file (or the first `limit`), checked; raises HellaSwagError at the first bad one."""
    path = Path(path)
    if not path.is_file():
        raise HellaSwagError(f"--hellaswag-data {path}: no such file")
    items = []
    for where, row in _rows(path):
        items.append(to_item(row, where))
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise HellaSwagError(f"{path}: no items")
    return items


def data_path(home: Home) -> Path:
    return home.hellaswag_dir / "validation.parquet"


def cached(home: Home) -> Path | None:
    """The fetched file if it is there and still has the sha256 recorded when it was fetched."""
    dest, meta = data_path(home), data_path(home).with_suffix(".json")
    if not (dest.is_file() and meta.is_file()):
        return None
    return dest if json.loads(meta.read_text()).get("sha256") == file_sha256(dest) else None


def fetch(home: Home, endpoint: str | None = None, revision: str = REVISION) -> Path:
    """The validation parquet in the home: fetched once from the Hub pinned to one commit, verified against the
    Hub's sha256, resumed after a cut (storage.hub); later calls use the local copy without the network."""
    from huggingface_hub import constants

    from storage.hub import Hub, HubError

    found = cached(home)
    if found is not None:
        return found
    hub = Hub(DATASET, endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT)
    sha = hub.resolve(revision)
    files = hub.list_files(sha, PATTERN)
    if len(files) != 1:
        raise HubError(f"{DATASET}@{revision}: expected one file matching {PATTERN}, found {len(files)}")
    dest = data_path(home)
    digest = hub.fetch(sha, files[0], dest)
    atomic_write_text(dest.with_suffix(".json"), json.dumps(
        {"dataset": DATASET, "revision": revision, "commit": sha, "path": files[0].path, "sha256": digest}, indent=1))
    return dest
