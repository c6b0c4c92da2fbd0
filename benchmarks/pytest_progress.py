"""pytest plugin of benchmarks/gpu_tests.sh (``-p pytest_progress``): with PYTEST_PROGRESS_FILE set,
each test's id is appended to that file as the test starts, and tests already listed there are
deselected. A process killed by a test (a segfault) thus leaves that test last in the file, and
the next run goes on after it."""
from __future__ import annotations

import os
from pathlib import Path


def _progress_file() -> Path | None:
    name = os.environ.get("PYTEST_PROGRESS_FILE")
    return Path(name) if name else None


def pytest_collection_modifyitems(config, items):
    path = _progress_file()
    if path is None or not path.exists():
        return
    started = set(path.read_text().splitlines())
    kept = [item for item in items if item.nodeid not in started]
    deselected = [item for item in items if item.nodeid in started]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept


def pytest_runtest_logstart(nodeid, location):
    path = _progress_file()
    if path is not None:
        with path.open("a") as progress:
            progress.write(nodeid + "\n")
            progress.flush()
            os.fsync(progress.fileno())
