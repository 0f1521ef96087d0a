"""The layout's rules, checked on the code itself: each thing in its folder, small functions, no import side effects.
Static reads (ast, radon) where they suffice; one subprocess imports every module to catch state it changes."""
from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from radon.complexity import cc_visit

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("flows", "tasks", "model", "storage", "dashboards")
MAX_COMPLEXITY = 20
MAX_LINES = 500


def modules(*folders: str) -> list[Path]:
    return sorted(p for f in folders for p in (ROOT / f).rglob("*.py"))


def imported(path: Path) -> set[str]:
    """Top-level names of every module `path` imports, at any depth of the file."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("folder,forbidden", [("tasks", "prefect"), ("model", "prefect"), ("storage", "prefect"),
                                              ("storage", "torch"), ("dashboards", "torch")])
def test_each_thing_lives_in_its_folder(folder, forbidden):
    # dashboards reach torch only through model/ (the playground), never directly
    bad = [str(p.relative_to(ROOT)) for p in modules(folder) if forbidden in imported(p)]
    assert not bad, f"{forbidden} imported in {folder}/: {bad}"


def test_prefect_tasks_and_flows_only_in_flows():
    bad = []
    for p in modules("tasks", "model", "storage", "dashboards"):
        text = p.read_text()
        if re.search(r"^\s*@(task|flow)\b", text, re.M):
            bad.append(str(p.relative_to(ROOT)))
    assert not bad, f"@task/@flow outside flows/: {bad}"


def test_no_function_above_complexity_limit():
    over = []
    for p in modules(*PRODUCT):
        for block in cc_visit(p.read_text()):
            if block.complexity > MAX_COMPLEXITY:
                over.append(f"{p.relative_to(ROOT)}:{block.lineno} {block.name} ({block.complexity})")
    assert not over, "cyclomatic complexity above 20: " + ", ".join(over)


def test_modules_are_small_and_say_what_they_are():
    for p in modules(*PRODUCT):
        text = p.read_text()
        n = text.count("\n")
        assert n <= MAX_LINES, f"{p.relative_to(ROOT)}: {n} lines"
        if not text.strip():
            continue  # an empty package marker
        doc = ast.get_docstring(ast.parse(text))
        assert doc and len(doc.strip().splitlines()) >= 2, f"{p.relative_to(ROOT)}: needs a two-line docstring"


def test_repository_names_no_private_notes():
    # the patterns are assembled so this file does not match itself
    pattern = "|".join(["sha" + "red/", "NO" + "TES"])
    out = subprocess.run(["git", "grep", "-nE", pattern, "--", ".", ":!*.png", ":!*.parquet"], cwd=ROOT,
                         capture_output=True, text=True)
    if out.returncode == 128:
        pytest.skip("not a git checkout")
    assert out.stdout == "", out.stdout


SNAPSHOT = r"""
import importlib, json, os, sys
for lib in ("polars", "streamlit"):  # they set variables of their own when imported (allocator, plot backend)
    importlib.import_module(lib)
before_env, before_prefix = dict(os.environ), sys.pycache_prefix
for name in sys.argv[1:]:
    importlib.import_module(name)
changed = sorted(k for k in set(os.environ) | set(before_env) if os.environ.get(k) != before_env.get(k))
print(json.dumps({"env": changed, "pycache_prefix": [before_prefix, sys.pycache_prefix]}))
"""


def test_imports_change_no_process_state():
    names = []
    for p in modules(*PRODUCT):
        rel = p.relative_to(ROOT).with_suffix("")
        if rel.parts[0] == "dashboards" and rel.name not in ("queries", "common"):
            continue  # Streamlit pages run when imported
        if rel.name == "__main__":
            continue
        names.append(".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts))
    out = subprocess.run([sys.executable, "-c", SNAPSHOT, *names], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    state = json.loads(out.stdout.strip().splitlines()[-1])
    assert state["env"] == [], f"importing the project changed environment variables: {state['env']}"
    assert state["pycache_prefix"][0] == state["pycache_prefix"][1]


OPTION = re.compile(r"^  (-\S.*?)(?:\s{2,}(\S.*))?$")


def _help_text(argv: list[str]) -> str:
    import contextlib
    import io

    from flows.cli import build_parser

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
        build_parser(argv[0] if argv else None).parse_args([*argv, "--help"])
    return buf.getvalue()


def _flags_without_help(argv: list[str]) -> list[str]:
    text = _help_text(argv)
    lines, out = text.splitlines(), []
    for i, line in enumerate(lines):
        m = OPTION.match(line)
        if not m or m.group(1).startswith("-h, --help"):
            continue
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if not m.group(2) and not (nxt.startswith("   ") and not OPTION.match(nxt)):
            out.append(f"langpwt {' '.join(argv)} {m.group(1).split()[0]}")
    nested = re.search(r"\{([a-z,-]+)\} \.\.\.", text.split("\n\n")[0])  # sub-subcommands in the usage line
    for name in nested.group(1).split(",") if nested and argv else []:
        out += _flags_without_help([*argv, name])
    return out


def test_every_flag_has_a_help_line():
    from flows.cli import COMMANDS

    commands = [c for names in COMMANDS.values() for c in names]
    missing = [f for c in commands for f in _flags_without_help([c])]
    assert not missing, "flags without help: " + ", ".join(missing)
