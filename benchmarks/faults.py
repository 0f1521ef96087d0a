"""Run the fault-injection suite and write its ledger table into benchmarks/RESULTS.md.
The suite itself asserts every contract; this only reruns it and records what was injected and survived."""
from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out" / "faults.json"
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
BEGIN, END = "<!-- faults:begin -->", "<!-- faults:end -->"


def main() -> int:
    OUT.unlink(missing_ok=True)
    t0 = time.time()
    env = dict(os.environ, LANGPWT_FAULTS_JSON=str(OUT))
    rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "tests/faults", *sys.argv[1:]], cwd=ROOT, env=env)
    minutes = (time.time() - t0) / 60
    data = json.loads(OUT.read_text())
    lines = [BEGIN, f"Measured {dt.date.today()} on {os.cpu_count()} cores: `python benchmarks/faults.py` "
             f"(seed {data['seed']}, {minutes:.1f} min, pytest exit {rc}).", "",
             "| fault | injected | survived | tokens lost | tokens duplicated |", "|---|---:|---:|---:|---:|"]
    for k, r in data["rows"].items():
        lines.append(f"| {k} | {r['injected']} | {r['survived']} | {r['tokens_lost']} | {r['tokens_duplicated']} |")
    notes = [f"- {k}: " + "; ".join(sorted(set(n.split(':', 1)[-1].strip()[:70] for n in r["notes"])))[:300]
             for k, r in data["rows"].items() if r["notes"]]
    lines += ["", "Outcomes seen:", *notes, END]
    block = "\n".join(lines)
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if BEGIN in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        text += "\n## Fault injection\n\n" + block + "\n"
    RESULTS.write_text(text)
    print(block)
    return rc


if __name__ == "__main__":
    sys.exit(main())
