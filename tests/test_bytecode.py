"""model.bytecode: on an install without bytecode (PYTHONDONTWRITEBYTECODE, no .pyc), training processes cache it
in a folder of ours, which their children use too; everywhere else Python is left alone."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import json, os, subprocess, sys
sys.path.insert(0, {lib!r})
from model.bytecode import cache_bytecode
chosen = cache_bytecode(package="shipless")
import shipless
child = subprocess.run([sys.executable, "-c", "import sys; print(sys.pycache_prefix, sys.flags.dont_write_bytecode)"],
                       capture_output=True, text=True, check=True).stdout.split()
print(json.dumps(dict(chosen=chosen, prefix=sys.pycache_prefix, child=child, value=shipless.VALUE)))
"""


def _package(lib: Path, shipped: bool) -> Path:
    pkg = lib / "shipless"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("from shipless.part import VALUE\n")
    (pkg / "part.py").write_text("VALUE = 42\n")
    if shipped:
        import compileall
        assert compileall.compile_dir(str(pkg), quiet=1)
    return pkg


def _run(tmp_path: Path, lib: Path, **env) -> dict:
    import json
    e = {k: v for k, v in os.environ.items() if k not in ("PYTHONPYCACHEPREFIX", "LANGPWT_PYCACHE")}
    e.update(PYTHONPATH=str(ROOT), PYTHONDONTWRITEBYTECODE="1", XDG_CACHE_HOME=str(tmp_path / "xdg"), **env)
    out = subprocess.run([sys.executable, "-c", PROBE.format(lib=str(lib))], env=e, capture_output=True,
                         text=True, check=True, cwd=tmp_path)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_an_install_without_bytecode_gets_a_cache_of_ours_that_children_share(tmp_path):
    pkg = _package(tmp_path / "lib", shipped=False)
    first = _run(tmp_path, tmp_path / "lib")
    cache = tmp_path / "xdg" / "langpwt" / "pycache"
    assert first["chosen"] == first["prefix"] == str(cache) and first["value"] == 42
    assert first["child"] == [str(cache), "0"]  # the prefix travels, writing is allowed there
    written = sorted(p.name.split(".")[0] for p in cache.rglob("*.pyc") if "shipless" in p.parts)
    assert written == ["__init__", "part"]
    assert not (pkg / "__pycache__").exists()  # nothing beside the sources
    stamps = {p: p.stat().st_mtime_ns for p in cache.rglob("*.pyc")}
    second = _run(tmp_path, tmp_path / "lib")
    assert second["chosen"] == str(cache)
    shipless = [p for p in stamps if "shipless" in p.parts]
    assert all(p.stat().st_mtime_ns == stamps[p] for p in shipless)  # read back, not compiled again


def test_python_is_left_alone_where_bytecode_ships_or_the_user_chose(tmp_path):
    _package(tmp_path / "lib", shipped=True)
    assert _run(tmp_path, tmp_path / "lib")["chosen"] is None
    assert not (tmp_path / "xdg").exists()
    lib2 = tmp_path / "two"
    _package(lib2, shipped=False)
    assert _run(tmp_path, lib2, LANGPWT_PYCACHE="off")["chosen"] is None
    mine = tmp_path / "mine"
    r = _run(tmp_path, lib2, PYTHONPYCACHEPREFIX=str(mine))
    assert r["chosen"] is None and r["prefix"] == str(mine)
    named = tmp_path / "named"
    assert _run(tmp_path, lib2, LANGPWT_PYCACHE=str(named))["chosen"] == str(named)
    assert any(named.rglob("part*.pyc"))
