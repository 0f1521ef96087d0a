"""The fault ledger: every injected fault and whether the contract held, printed as one table.
Tests add rows; the suite's conftest prints the table and writes it as JSON for benchmarks/faults.py."""
from __future__ import annotations

import json
import os
import random
from collections import Counter
from pathlib import Path

SEED = int(os.environ.get("LANGPWT_FAULT_SEED", "20261124"))
ROWS: dict[str, dict] = {}
OUT = Path(os.environ.get("LANGPWT_FAULTS_JSON", Path(__file__).resolve().parents[2] / "benchmarks/out/faults.json"))


def rng(name: str) -> random.Random:
    """A generator per fault kind: a failure replays with the same LANGPWT_FAULT_SEED."""
    return random.Random(f"{SEED}:{name}")


def record(fault: str, survived: bool, lost: int = 0, duplicated: int = 0, note: str = "") -> None:
    r = ROWS.setdefault(fault, dict(injected=0, survived=0, tokens_lost=0, tokens_duplicated=0, notes=[]))
    r["injected"] += 1
    r["survived"] += int(survived)
    r["tokens_lost"] += lost
    r["tokens_duplicated"] += duplicated
    if note:
        r["notes"].append(note)


def token_diff(expected: Counter, got: Counter, n_tokens) -> tuple[int, int]:
    """(tokens lost, tokens duplicated) between two multisets of documents."""
    lost = sum(n_tokens(d) * c for d, c in (expected - got).items())
    dup = sum(n_tokens(d) * c for d, c in (got - expected).items())
    return lost, dup


def table() -> str:
    head = f"{'fault':<44} {'injected':>8} {'survived':>8} {'tokens lost':>11} {'tokens dup':>10}"
    lines = [head, "-" * len(head)]
    for k, r in ROWS.items():
        lines.append(f"{k:<44} {r['injected']:>8} {r['survived']:>8} {r['tokens_lost']:>11} "
                     f"{r['tokens_duplicated']:>10}")
    return "\n".join(lines)


def save() -> None:
    if ROWS:
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps(dict(seed=SEED, rows=ROWS), indent=2))
