"""The wheel's virtualenv for test_install, built once per run beside the other tests.

Building it takes seconds (the sdist, the wheel from it, an offline install;
then the README's install commands), nearly all of it waiting on child
processes: a thread does it while the tests run, in the pytest process, or
under pytest-xdist in the controller, which runs no test itself (two
workers building one each would cost twice). Whoever needs the result
waits on a file lock the builder holds until that part is done: no polling.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import tempfile
import threading
import traceback
from pathlib import Path
from typing import Any, Iterable, Optional

INSTALL_TESTS = "tests/test_install.py"
README_TEST = "test_readme_install_commands"


PARTS = ("wheel", "readme")  # built in this order: the README's installs use the wheel and its sdist


class WheelBuild:
    """One build in ``root``; each part locked from construction until it is done (or not needed)."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="pulsyflux-wheel-"))
        self._locks: dict[str, Any] = {}
        for part in PARTS:
            self._locks[part] = open(self.root / f"{part}.lock", "w")
            fcntl.flock(self._locks[part], fcntl.LOCK_EX)
        self._thread: Optional[threading.Thread] = None

    def start(self, nodeids: Iterable[str]) -> None:
        """Build if the collected tests (their node ids) include test_install's; once."""
        if self._thread is not None or not self._locks:
            return
        wanted = [nodeid for nodeid in nodeids if nodeid.startswith(INSTALL_TESTS)]
        if not wanted:
            self._release(*PARTS)
            return
        readme = any(README_TEST in nodeid for nodeid in wanted)
        self._thread = threading.Thread(target=self._build, args=(readme,), name="wheel build", daemon=True)
        self._thread.start()

    def _build(self, readme: bool) -> None:
        from .twistd_process import ReadmeInstalls, build_wheel_venv

        part = "wheel"
        try:
            _write(self.root / "wheel.json", {"root": str(self.root), "bin": str(build_wheel_venv(self.root))})
            self._release(part)
            part = "readme"
            if readme:
                _write(self.root / "readme.json", vars(ReadmeInstalls.make(self.root)))
        except Exception:
            _write(self.root / f"{part}.failed.json", {"error": traceback.format_exc()})
        finally:
            self._release(*PARTS)

    def _release(self, *parts: str) -> None:
        for part in parts:
            lock = self._locks.pop(part, None)
            if lock is not None:
                fcntl.flock(lock, fcntl.LOCK_UN)
                lock.close()

    def finish(self) -> None:
        """At the end of the run: let the build end, then remove everything it made."""
        if self._thread is not None:
            self._thread.join()
        self._release(*PARTS)
        shutil.rmtree(self.root, ignore_errors=True)


def _write(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data))


def result(root: Path, name: str) -> Optional[dict]:
    """What the build in ``root`` left under ``name`` ("wheel", "readme"), once it is done.

    None if it was not made (the tests that need it were not collected);
    the build's own error if it failed.
    """
    with open(root / f"{name}.lock") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH)  # returns once the builder has let go of that part
    failed = root / f"{name}.failed.json"
    if failed.exists():
        raise RuntimeError(f"building the {name} part failed:\n" + json.loads(failed.read_text())["error"])
    path = root / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None
