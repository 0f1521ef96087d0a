"""Where Python caches the bytecode of the modules a training process imports, on installs that ship none.
An image built with PYTHONDONTWRITEBYTECODE and no .pyc recompiles torch on every start (~13 s of a seed run's
start-up on the H200 image); a prefix cache costs one compile per machine, and never writes beside the sources."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

ENV = "LANGPWT_PYCACHE"  # a folder, or "off" to leave Python's own choice alone


def default_folder() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "langpwt" / "pycache"


def shipped_bytecode(package: str = "torch") -> bool | None:
    """Whether `package` has its own bytecode beside its sources (None: not installed)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    # the path beside the source, whatever prefix is set: the question is what the install itself holds
    src = Path(spec.origin)
    return (src.parent / "__pycache__" / f"{src.stem}.{sys.implementation.cache_tag}.pyc").exists()


def cache_bytecode(environ: dict | None = None, package: str = "torch") -> str | None:
    """Point Python's bytecode cache at a folder of ours when torch has none of its own, for this process and
    the ones it starts (torchrun ranks, Inductor's compile workers). Returns the folder, or None if left alone:
    a prefix the user chose, `LANGPWT_PYCACHE=off`, an install with bytecode, or a folder we cannot write."""
    global _chosen
    env = os.environ if environ is None else environ
    if _chosen is not None and sys.pycache_prefix == _chosen:
        return _chosen  # already ours (model/__init__ calls this first)
    choice = env.get(ENV, "")
    if choice.lower() in ("off", "0", "no") or sys.pycache_prefix or env.get("PYTHONPYCACHEPREFIX"):
        return None
    if not choice and shipped_bytecode(package) is not False:
        return None
    folder = Path(choice) if choice else default_folder()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    if not os.access(folder, os.W_OK):
        return None
    sys.pycache_prefix = str(folder)
    # PYTHONDONTWRITEBYTECODE keeps sources clean; a prefix writes nothing beside them, so writing is allowed
    sys.dont_write_bytecode = False
    env["PYTHONPYCACHEPREFIX"] = str(folder)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    _chosen = str(folder)
    return _chosen


_chosen: str | None = None
