"""Fault-injection suite: seeded, on CPU and small data; prints the ledger table at the end."""
import pytest

from tests.faults import ledger


def pytest_terminal_summary(terminalreporter):
    if ledger.ROWS:
        terminalreporter.write_sep("=", f"fault ledger (seed {ledger.SEED})")
        terminalreporter.write_line(ledger.table())
        ledger.save()


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/faults" in str(item.fspath):
            item.add_marker(pytest.mark.slow)
