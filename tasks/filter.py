"""Filter documents with Polars: per-document rules, then exact dedup across the whole dataset.
Dedup keeps the first occurrence in sorted-file order, so it needs the hashes of earlier files
(the scan step) but never their text; hashes are Polars' own, fixed seeds, so the version is pinned."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import polars as pl

SEED_ID, SEED_TEXT, SEED_SPLIT = 0x4C61, 0x6E67, 0x5057
# the order in which reasons are checked; the first that applies is the one recorded
REASONS = ("null_text", "empty_text", "low_int_score", "low_language_score", "too_short",
           "too_long", "dump_excluded", "dup_id", "dup_text")


@dataclass(frozen=True)
class FilterConfig:
    min_int_score: int | None = 3
    min_language_score: float | None = None
    min_chars: int | None = None
    max_chars: int | None = None
    dumps: tuple[str, ...] | None = None
    dedup: bool = True
    val_fraction: float = 0.005

    def __post_init__(self):
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction={self.val_fraction}: must be in [0, 1)")
        if self.dumps is not None:
            object.__setattr__(self, "dumps", tuple(sorted(self.dumps)))

    def as_dict(self) -> dict:
        d = asdict(self)
        d["dumps"] = list(self.dumps) if self.dumps is not None else None
        return d

    def digest(self) -> str:
        d = dict(self.as_dict(), polars=pl.__version__)  # hashes are stable within one version only
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def rule_reason(cfg: FilterConfig) -> pl.Expr:
    """The first per-document rule a row fails, or null when it passes them all."""
    text, n = pl.col("text"), pl.col("text").str.len_chars()
    # empty <=> zero bytes: no need to count the characters of every text unless a length rule is on
    checks: list[tuple[pl.Expr, str]] = [(text.is_null(), "null_text"), (text.str.len_bytes() == 0, "empty_text")]
    if cfg.min_int_score is not None:
        checks.append((pl.col("int_score").fill_null(-1) < cfg.min_int_score, "low_int_score"))
    if cfg.min_language_score is not None:
        checks.append((pl.col("language_score").fill_null(-1.0) < cfg.min_language_score,
                       "low_language_score"))
    if cfg.min_chars is not None:
        checks.append((n < cfg.min_chars, "too_short"))
    if cfg.max_chars is not None:
        checks.append((n > cfg.max_chars, "too_long"))
    if cfg.dumps is not None:
        checks.append((~pl.col("dump").is_in(list(cfg.dumps)).fill_null(False), "dump_excluded"))
    expr = pl.lit(None, dtype=pl.String)
    for cond, reason in reversed(checks):
        expr = pl.when(cond.fill_null(False)).then(pl.lit(reason)).otherwise(expr)
    return expr


def hash_columns() -> list[pl.Expr]:
    """Dedup keys: 64-bit hashes of id and text, plus the length as a second text key."""
    return [
        pl.col("id").hash(seed=SEED_ID).alias("id_hash"),
        pl.col("text").hash(seed=SEED_TEXT).alias("text_hash"),
        pl.col("text").str.len_bytes().fill_null(0).cast(pl.UInt64).alias("text_len"),
    ]


# The validation split, defined once for a subset: the documents of its FIRST file (position 0) whose id
# hash falls in `val_fraction`, in file order, up to VAL_MAX_TOKENS tokens (the rest of them go to train);
# every other file's documents all go to train. So `--max-files 2` and the full subset hold out the same
# documents. VAL_RULE is part of every shard's config hash: changing the rule makes the shards stale.
VAL_FILE = 0
VAL_MAX_TOKENS = 10_000_000
VAL_RULE = dict(file=VAL_FILE, max_tokens=VAL_MAX_TOKENS, hash_seed=SEED_SPLIT)


def val_mask(ids: pl.Expr, fraction: float) -> pl.Expr:
    """Validation membership from a hash of the document id: stable whatever the file order."""
    return (ids.hash(seed=SEED_SPLIT) % 1_000_000) < int(round(fraction * 1_000_000))


def val_candidates(ids: pl.Expr, fraction: float, position: int) -> pl.Expr:
    """Documents that go to val while VAL_MAX_TOKENS allows: hash-selected ones of the subset's first file."""
    return val_mask(ids, fraction) if position == VAL_FILE else pl.lit(False)


def _shared(earlier: pl.LazyFrame, cur: pl.DataFrame, on: list[str]) -> pl.DataFrame:
    """The distinct `on` keys of `earlier` whose first column's value `cur` also has (a superset of the keys
    they share, as small): joined on one column, since polars hashes a key of several through a row encoding
    of a few hundred bytes a row, and one column in a few."""
    return (earlier.select(on).join(cur.lazy().select(on[0]).unique(), on=on[0], how="semi").unique()
            .collect(engine="streaming"))


def _first_texts(cur: pl.DataFrame, seen: pl.DataFrame | None) -> pl.Expr:
    """True for `cur`'s rows whose (text_hash, text_len) is the first of this file and not in `seen`. Pairs
    are compared only where text_hash repeats or was seen (the rare rows): see `_shared` for why."""
    pair = pl.struct("text_hash", "text_len")
    suspect = pl.col("text_hash").is_duplicated()
    first = pair.is_first_distinct()
    if seen is not None:
        suspect = suspect | pl.col("text_hash").is_in(seen["text_hash"].implode())
        first = first & ~pair.is_in(seen.select(pair).to_series().implode())
    later = cur.filter(suspect).filter(~first)["_row"]
    return ~pl.col("_row").is_in(later.implode())


def dedup_reasons(current: pl.DataFrame, earlier: pl.LazyFrame | None) -> pl.Series:
    """Reasons (`dup_id`, `dup_text` or null) for `current`'s rows that passed the rules.

    `current` holds rule_reason, id_hash, text_hash, text_len; `earlier` the keys of rows that
    passed the rules in files before this one. First occurrence in (file, row) order wins."""
    keys = ["id_hash", "text_hash", "text_len"]
    cur = current.select(*keys, pl.col("rule_reason").is_null().alias("_ok"))
    n = cur.height
    cur = cur.with_row_index("_row").filter("_ok").select("_row", *keys)
    first_id = pl.col("id_hash").is_first_distinct()
    seen_texts = None
    if earlier is not None:
        # only the earlier keys this file also holds are read into memory (a streamed semi-join): what the
        # earlier files hold in all grows with their number, what they share with one file does not
        seen_ids = _shared(earlier, cur, ["id_hash"])
        seen_texts = _shared(earlier, cur, ["text_hash", "text_len"])
        first_id = first_id & ~pl.col("id_hash").is_in(seen_ids["id_hash"].implode())
    first_text = _first_texts(cur, seen_texts)
    flagged = cur.with_columns(first_id.alias("_first_id"), first_text.alias("_first_text"))
    reason = (pl.when(~pl.col("_first_id")).then(pl.lit("dup_id"))
              .when(~pl.col("_first_text")).then(pl.lit("dup_text")).otherwise(None))
    out = pl.DataFrame({"_row": pl.arange(0, n, eager=True, dtype=pl.UInt32)})
    out = out.join(flagged.select("_row", reason.alias("dup")), on="_row", how="left")
    return out.sort("_row")["dup"]
