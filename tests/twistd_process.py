"""Run ``twistd -n pulsyflux`` as a child process and watch its log.

Used by the end-to-end tests that check what a user gets after a real
``pip install`` of the wheel.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import venv
from dataclasses import dataclass
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol

REPO = Path(__file__).resolve().parents[1]
LISTENING = re.compile(r'pulsyflux server listening on ([^\s"]+)')  # in a text or a JSON line


def _run(argv: list[str]) -> None:
    """Run a set-up step; if it fails, the error says what it printed."""
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout}{done.stderr}")


def build_dists(root: Path) -> tuple[Path, Path]:
    """The project's sdist, and its wheel built from that sdist (as ``python -m build`` does).

    Offline (``PIP_NO_INDEX=1`` works): no build isolation, with the
    setuptools that the ``test`` extra installs.
    """
    dist = root / "dist"
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(REPO)])
    [sdist] = dist.glob("pulsyflux-*.tar.gz")
    [wheel] = dist.glob("pulsyflux-*.whl")
    return sdist, wheel


def bare_venv(env_dir: Path) -> Path:
    """A new virtualenv that sees this one's packages, except pulsyflux and its twistd plugin.

    No ensurepip (it costs seconds) and no downloads: the dependencies,
    pip and setuptools included, are links to the ones installed here, so
    pulsyflux comes only from what the test installs.
    Returns the virtualenv's bin directory.
    """
    venv.create(env_dir, with_pip=False)
    [site] = (env_dir / "lib").glob("*/site-packages")
    deps = env_dir / "deps"
    deps.mkdir()
    import twisted

    here = Path(twisted.__file__).resolve().parents[1]  # where this environment's packages are
    for entry in here.iterdir():
        name = entry.name
        if name.startswith(("pulsyflux", "__editable__", "_pulsyflux")) or name.endswith(".pth") or name == "twisted":
            continue
        (deps / name).symlink_to(entry)
    # Twisted itself, minus any pulsyflux plugin an install here put among its plugins.
    (deps / "twisted").mkdir()
    for entry in (here / "twisted").iterdir():
        if entry.name != "plugins":
            (deps / "twisted" / entry.name).symlink_to(entry)
    (deps / "twisted" / "plugins").mkdir()
    for entry in (here / "twisted" / "plugins").iterdir():
        if entry.suffix == ".py":
            (deps / "twisted" / "plugins" / entry.name).symlink_to(entry)
    (site / "_test_dependencies.pth").write_text(f"{deps}\n")
    # Twisted's own command, as installing Twisted there would have made it.
    twistd = env_dir / "bin" / "twistd"
    twistd.write_text(
        f"#!{env_dir / 'bin' / 'python'}\nimport sys\nfrom twisted.scripts.twistd import run\nsys.exit(run())\n"
    )
    twistd.chmod(0o755)
    return env_dir / "bin"


def pip_install(bindir: Path, *args: str) -> None:
    """``pip install`` into the virtualenv of ``bindir``: offline, dependencies already there."""
    pip = [str(bindir / "python"), "-m", "pip", "install", "-q"]  # this virtualenv's pip, linked in there
    _run([*pip, "--no-index", "--no-deps", "--no-build-isolation", *args])


def build_wheel_venv(root: Path) -> Path:
    """Build the project's sdist and wheel and install the wheel into a new virtualenv.

    The wheel's Twisted plugin cache cannot be written there (as for a user
    running twistd from a root-owned install). Returns the virtualenv's bin
    directory; the sdist and wheel are left in ``root / "dist"``.
    """
    _, wheel = build_dists(root)
    bindir = bare_venv(root / "venv")
    pip_install(bindir, str(wheel))
    [plugins] = (root / "venv" / "lib").glob("*/site-packages/twisted/plugins")
    (plugins / "dropin.cache").mkdir()  # unwritable, even for root: renaming a file over it fails
    return bindir


def plugin_and_package(bindir: Path, cwd: Path) -> tuple[str, str]:
    """Where that virtualenv's twistd finds the pulsyflux plugin and package, run from ``cwd``.

    Parses ``twistd pulsyflux`` as twistd does ("Unknown command: pulsyflux" if
    it is not found), in one process rather than one per question.
    """
    script = (
        "from twisted.scripts.twistd import ServerOptions; ServerOptions().parseOptions(['pulsyflux']);"
        " import pulsyflux, twisted.plugins.pulsyflux_plugin as p; print(p.__file__); print(pulsyflux.__file__)"
    )
    where = subprocess.run([str(bindir / "python"), "-c", script], capture_output=True, text=True, cwd=cwd)
    if where.returncode:
        raise RuntimeError(f"twistd does not find pulsyflux from {cwd}:\n{where.stdout}{where.stderr}")
    plugin, package = where.stdout.split()
    return plugin, package


@dataclass
class ReadmeInstalls:
    """The README's two install commands run in either order in one virtualenv (``readme_installs``).

    ``places`` holds where twistd found the plugin and the package after
    each step: ``pip install -e`` of the unpacked sdist (``clone``), then
    ``pip install`` of the wheel, then ``-e`` again. Plain data: it may be
    made in another process (tests/wheel_build.py).
    """

    clone: str
    bindir: str
    site: str
    elsewhere: str
    places: list[list[str]]

    @classmethod
    def make(cls, root: Path) -> "ReadmeInstalls":
        import tarfile

        [sdist] = (root / "dist").glob("pulsyflux-*.tar.gz")
        [wheel] = (root / "dist").glob("pulsyflux-*.whl")
        here = root / "readme"
        here.mkdir()
        with tarfile.open(sdist) as archive:
            # The "data" filter exists from Python 3.9.17 (PyPy 3.9 is 3.9.16); our own sdist is trusted anyway.
            extract = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            archive.extractall(here, **extract)
        [clone] = here.glob("pulsyflux-*")
        bindir = bare_venv(here / "venv")
        elsewhere = here / "elsewhere"
        elsewhere.mkdir()
        places = []
        for args in (["-e", str(clone)], [str(wheel)], ["-e", str(clone)]):
            pip_install(bindir, *args)
            places.append(list(plugin_and_package(bindir, elsewhere)))
        return cls(str(clone), str(bindir), str(here / "venv" / "lib"), str(elsewhere), places)


class TwistdProcess(ProcessProtocol):
    """Collects output; ``listening`` fires with "host:port" once the server logs it."""

    def __init__(self) -> None:
        self.output = ""
        self.listening: Deferred[str] = Deferred()
        self.ended: Deferred[bool] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data.decode("utf-8", "replace")
        match = LISTENING.search(self.output)
        if match and not self.listening.called:
            self.listening.callback(match.group(1))

    errReceived = outReceived

    def processEnded(self, reason) -> None:
        code = getattr(reason.value, "exitCode", None)
        sig = getattr(reason.value, "signal", None)
        if not self.listening.called:
            self.listening.errback(RuntimeError(f"twistd exited ({code}) before listening:\n{self.output}"))
        # twistd re-raises the SIGTERM it handled once shut down, so a clean
        # stop is exit code 0 or death by SIGTERM after the shutdown log line.
        clean = (code == 0 or sig == signal.SIGTERM) and "Server Shut Down." in self.output
        self.ended.callback(clean and "Traceback" not in self.output)

    def terminate(self) -> Deferred:
        if not self.ended.called:
            self.transport.signalProcess(signal.SIGTERM)
        return self.ended


def spawn_twistd(bindir: Path, cwd: Path, *args: str) -> TwistdProcess:
    proto = TwistdProcess()
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    argv = [str(bindir / "twistd"), "-n", "--pidfile=", "pulsyflux", *args]
    reactor.spawnProcess(proto, argv[0], argv, env=env, path=str(cwd))
    return proto
