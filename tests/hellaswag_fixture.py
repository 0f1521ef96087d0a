"""HellaSwag-shaped items cut from the bundled sample's real English documents, in the original schema.
The right ending continues its own document; the wrong ones are spans of other documents, as adversarial as
chance makes them. Some contexts carry WikiHow's bracket markup so the preprocessing has work to do."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"


def sample_texts() -> list[str]:
    """The sample's documents of at least 80 words, in file order."""
    texts = pa.concat_tables([pq.read_table(p, columns=["text"]) for p in sorted(SAMPLE.glob("*.parquet"))])
    return [t for t in texts.column("text").to_pylist() if len(t.split()) >= 80]


def make_rows(texts: list[str], n: int, seed: int = 0) -> list[dict]:
    """`n` rows in the original schema (ctx_a, ctx_b, activity_label, endings, label and the rest)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = texts[i % len(texts)].split()
        start = rng.randrange(0, max(1, len(words) - 60))
        ctx_a = " ".join(words[start:start + 24])
        ctx_b = " ".join(words[start + 24:start + 30]).lower()
        right = " ".join(words[start + 30:start + 30 + rng.randint(8, 20)])
        endings = [right]
        while len(endings) < 4:
            other = texts[rng.randrange(len(texts))].split()
            at = rng.randrange(0, len(other) - 20)
            endings.append(" ".join(other[at:at + rng.randint(8, 20)]))
        label = rng.randrange(4)
        endings[0], endings[label] = endings[label], endings[0]
        if i % 3 == 0:  # the WikiHow half of HellaSwag: bracketed step markup
            ctx_a = "[header] " + ctx_a.replace(" ", " [title] ", 1)
        rows.append({"ind": i, "activity_label": " ".join(words[:2]).strip(".,;:"), "ctx_a": ctx_a, "ctx_b": ctx_b,
                     "ctx": ctx_a + " " + ctx_b, "endings": endings, "source_id": f"sample~{i}",
                     "split": "val", "split_type": "indomain", "label": label})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_hub_parquet(path: Path, rows: list[dict]) -> Path:
    """The rows in the Hub's schema (Rowan/hellaswag's parquet: label a string)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist([dict(r, label=str(r["label"])) for r in rows]), path)
    return path
