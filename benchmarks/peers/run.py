"""pulsyflux next to its peers: the same workloads, one table.

    python benchmarks/peers/run.py --runs 3 --crossbar /path/to/crossbar-venv

Run it with the project's Python (its venv: Twisted, hiredis and pulsyflux
installed); every client of every peer runs on that CPython, except
Crossbar's Autobahn clients, which run on the Python of Crossbar's own
virtualenv (CPython as well). The columns:

* pulsyflux (CPython) and pulsyflux server on PyPy: one run of ``pulsyflux
  bench rpc`` and ``pulsyflux bench pubsub`` each (pulsyflux_peer.py);
* bare Twisted relay: the baseline ``pulsyflux bench rpc`` measures in the same run
  (one at a time and the 1 MiB echo);
* Crossbar, Redis and NATS: the same workloads through their own clients
  (crossbar_peer.py, redis_peer.py, nats_peer.py; shapes in workload.py),
  against a server this script starts on a free loopback port and stops.

A peer that is not installed is skipped with a one-line reason. The runs are
interleaved (every peer's run 1, then every peer's run 2, ...) so that a
change in the machine's load hits all columns alike; each cell is the median
over the runs. Not part of the test suite; see docs/performance.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent  # the checkout whose pulsyflux is measured
COLUMNS = {
    "pulsyflux": "pulsyflux (CPython)",
    "pypy": "pulsyflux server on PyPy",
    "relay": "bare Twisted relay",
    "crossbar": "Crossbar",
    "redis": "Redis",
    "nats": "NATS",
}
INSTALL = {
    "pulsyflux": "pip install -e '.[test]' (the project's venv, which runs this script)",
    "pypy": "apt-get install pypy3 pypy3-venv; pypy3 -m venv .venv-pypy; .venv-pypy/bin/pip install -e . "
    "(what .ci/run makes); pass --pypy .venv-pypy/bin/python",
    "relay": "nothing: pulsyflux/bench/relay.py, measured by the pulsyflux run",
    "crossbar": "python3 -m venv VENV; VENV/bin/pip install crossbar==26.10.1 'numpy<2'; pass --crossbar VENV",
    "redis": "apt-get install redis-server (Debian's; the cluster tests use it too); clients use hiredis",
    "nats": "apt-get install nats-server (Debian's)",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, seconds: float, name: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with status {process.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{name} did not listen on port {port} within {seconds:.0f} s")


def output(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"? ({error})"
    return (done.stdout or done.stderr).strip().splitlines()[0] if (done.stdout or done.stderr).strip() else "?"


class Server:
    """A peer's server process, in a session of its own so that it and its workers stop together."""

    def __init__(self, name: str, argv: list[str], port: int, log: Path, cwd: Optional[str] = None) -> None:
        self.name = name
        self.port = port
        self.log = log
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd, start_new_session=True
            )

    def pids(self) -> list[int]:
        """Every process of the server's session: the server and, for Crossbar, its workers."""
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    fields = (entry / "stat").read_text().rpartition(")")[2].split()
                except OSError:
                    continue
                if int(fields[3]) == self.process.pid:
                    found.append(int(entry.name))
        return found

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # the group this Popen started, nothing else
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def start_redis(binary: str, tmp: Path) -> Server:
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    server = Server("redis-server", argv + ["--dir", str(tmp)], port, tmp / "redis.log")
    wait_for_port(port, server.process, 20, "redis-server")
    return server


def start_nats(binary: str, tmp: Path) -> Server:
    port = free_port()
    config = tmp / "nats.conf"
    # max_payload above the 1 MiB echo (the default is exactly 1 MiB)
    config.write_text(f"listen: 127.0.0.1:{port}\nmax_payload: 8MB\n")
    server = Server("nats-server", [binary, "-c", str(config)], port, tmp / "nats.log")
    wait_for_port(port, server.process, 20, "nats-server")
    return server


def start_crossbar(venv: Path, tmp: Path) -> Server:
    port = free_port()
    cbdir = tmp / "crossbar" / ".crossbar"
    cbdir.mkdir(parents=True)
    permissions = {"call": True, "register": True, "publish": True, "subscribe": True}
    config = {
        "version": 2,
        "controller": {},
        "workers": [
            {
                "type": "router",
                "realms": [
                    {
                        "name": "realm1",
                        "roles": [
                            {
                                "name": "anonymous",
                                "permissions": [
                                    {
                                        "uri": "",
                                        "match": "prefix",
                                        "allow": permissions,
                                        "disclose": {"caller": False, "publisher": False},
                                        "cache": True,
                                    }
                                ],
                            }
                        ],
                    }
                ],
                "transports": [
                    {
                        "type": "rawsocket",
                        "endpoint": {"type": "tcp", "port": port, "interface": "127.0.0.1"},
                        "serializers": ["msgpack"],
                        "options": {"max_message_size": 1 << 24},
                    }
                ],
            }
        ],
    }
    (cbdir / "config.json").write_text(json.dumps(config, indent=2))
    argv = [str(venv / "bin" / "crossbar"), "start", "--cbdir", str(cbdir)]
    server = Server("crossbar", argv, port, tmp / "crossbar.log", cwd=str(cbdir.parent))
    wait_for_port(port, server.process, 90, "crossbar")
    return server


# -- one run of one peer ---------------------------------------------------------------


def run_peer(argv: list[str], env: dict[str, str], timeout: float) -> dict:
    """Run a peer script; its last line of output is its numbers as JSON."""
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, env=env, timeout=timeout, stdin=subprocess.DEVNULL, cwd=str(HERE)
        )
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish within {timeout:.0f} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        last = [line for line in done.stderr.strip().splitlines() if line.strip()][-1:] or ["no output"]
        return {"error": f"exit status {done.returncode}: {last[0][:300]}"}
    return json.loads(lines[-1])


def median(values: list[Optional[float]]) -> Optional[float]:
    present = [v for v in values if isinstance(v, (int, float))]
    return statistics.median(present) if present else None


def cpu_text(value: float) -> str:
    """Microseconds of CPU: two decimals below 1 µs (Redis and NATS are there), one above."""
    return f"{value:,.2f} µs" if value < 1 else f"{value:,.1f} µs"


ROWS: list[tuple[str, str, Callable[[float], str]]] = [
    ("request/response one at a time, 16 B", "sequential_per_s", lambda v: f"{v:,.0f}/s"),
    ("requests in flight, 10 × 16", "inflight_per_s", lambda v: f"{v:,.0f}/s"),
    ("1 MiB echo", "echo_mb_per_s", lambda v: f"{v:,.0f} MB/s"),
    ("pub/sub 1 → 1, 100 B", "flood_1_per_s", lambda v: f"{v:,.0f}/s"),
    ("pub/sub 1 → 10 (deliveries)", "flood_10_per_s", lambda v: f"{v:,.0f}/s"),
    ("publish → receive p50", "latency_p50_us", lambda v: f"{v:,.0f} µs"),
    ("server CPU per request in flight", "inflight_server_cpu_us", cpu_text),
    ("server CPU per message 1 → 1", "flood_1_server_cpu_us", cpu_text),
    ("server CPU per delivery 1 → 10", "flood_10_server_cpu_us", cpu_text),
]


def table(columns: list[str], runs: dict[str, list[dict]]) -> str:
    """The markdown table: a row per workload, a column per measured peer, medians over the runs."""
    lines = [
        "| work | " + " | ".join(COLUMNS[c] for c in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for title, key, shown in ROWS:
        cells = []
        for column in columns:
            value = median([r.get(key) for r in runs[column]])
            cell = "—" if value is None else shown(value)
            if key == "sequential_per_s" and value is not None:
                p50 = median([r.get("sequential_p50_us") for r in runs[column]])
                cell += "" if p50 is None else f", p50 {p50:,.0f} µs"
            cells.append(cell)
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def brief(result: dict) -> str:
    """One run's numbers on one progress line."""
    return ", ".join(f"{key} {value:,.0f}" for key, value in result.items() if isinstance(value, (int, float)))


def load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description="Measure pulsyflux, its server on PyPy, a bare Twisted relay, Crossbar, Redis and NATS with "
        "the same workloads (interleaved runs) and print one markdown table of medians.",
        epilog="Install notes for each peer: docs/performance.md, 'Against other brokers'.",
    )
    parser.add_argument("--runs", type=int, default=3, help="runs of every peer; each cell is their median (default 3)")
    parser.add_argument("--duration", type=float, default=1.0, help="seconds per measurement (default 1.0)")
    parser.add_argument("--warmup", type=float, default=0.3, help="seconds of load before counting (default 0.3)")
    parser.add_argument(
        "--peers",
        default=",".join(COLUMNS),
        help=f"comma-separated columns to measure (default all: {','.join(COLUMNS)})",
    )
    parser.add_argument(
        "--pypy",
        metavar="PYTHON",
        default=os.environ.get("PULSYFLUX_BENCH_PYPY") or str(ROOT / ".venv-pypy" / "bin" / "python"),
        help="the PyPy interpreter for the server (with pulsyflux's dependencies installed; this checkout is put "
        "on its PYTHONPATH) (default: $PULSYFLUX_BENCH_PYPY or .venv-pypy/bin/python, which .ci/run makes)",
    )
    parser.add_argument(
        "--crossbar",
        metavar="VENV",
        default=os.environ.get("PULSYFLUX_BENCH_CROSSBAR"),
        help="the virtualenv with crossbar installed (default: $PULSYFLUX_BENCH_CROSSBAR)",
    )
    parser.add_argument(
        "--redis-server",
        metavar="PATH",
        default=shutil.which("redis-server") or "/usr/bin/redis-server",
        help="the redis-server binary (default: on PATH, or /usr/bin/redis-server)",
    )
    parser.add_argument(
        "--nats-server",
        metavar="PATH",
        default=shutil.which("nats-server") or "/usr/sbin/nats-server",
        help="the nats-server binary (default: on PATH, or /usr/sbin/nats-server)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write every run's numbers to FILE")
    args = parser.parse_args(argv)
    wanted = [c.strip() for c in args.peers.split(",") if c.strip()]
    unknown = [c for c in wanted if c not in COLUMNS]
    if unknown:
        parser.error(f"unknown peer {', '.join(unknown)}: choose from {', '.join(COLUMNS)}")
    runs = max(1, args.runs)

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    # pulsyflux's runs (and their children, PyPy's too) import this checkout; the peers' scripts need nothing of it
    checkout = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    timing = ["--duration", str(args.duration), "--warmup", str(args.warmup)]
    versions: dict[str, str] = {}
    skipped: dict[str, str] = {}
    commands: dict[str, list[str]] = {}  # column -> argv of its peer script (relay rides on pulsyflux's)
    starters: dict[str, Callable[[Path], Server]] = {}

    if "pulsyflux" in wanted or "relay" in wanted:
        commands["pulsyflux"] = [sys.executable, "pulsyflux_peer.py", *timing]
        if "relay" not in wanted:
            commands["pulsyflux"].append("--no-relay")
        versions["pulsyflux"] = f"CPython {platform.python_version()} ({sys.executable})"
    if "pypy" in wanted:
        pypy = args.pypy
        check = (
            subprocess.run(
                [
                    pypy,
                    "-c",
                    "import platform, twisted; print(platform.python_implementation(), platform.python_version())",
                ],
                capture_output=True,
                text=True,
            )
            if os.access(pypy, os.X_OK)
            else None
        )
        if check is None or check.returncode != 0:
            skipped["pypy"] = f"no usable PyPy at {pypy} (--pypy PYTHON; it needs Twisted and pulsyflux's dependencies)"
        elif not check.stdout.startswith("PyPy"):
            skipped["pypy"] = f"{pypy} is {check.stdout.strip()}, not PyPy"
        else:
            commands["pypy"] = [sys.executable, "pulsyflux_peer.py", "--no-relay", "--server-python", pypy, *timing]
            versions["pypy"] = f"{check.stdout.strip()} ({pypy}); clients on CPython"
    if "crossbar" in wanted:
        venv = Path(args.crossbar) if args.crossbar else None
        if venv is None:
            skipped["crossbar"] = "no --crossbar VENV given (a virtualenv with crossbar==26.10.1)"
        elif not (venv / "bin" / "crossbar").exists():
            skipped["crossbar"] = f"{venv} has no bin/crossbar"
        else:
            python = str(venv / "bin" / "python")
            commands["crossbar"] = [python, "crossbar_peer.py", "--port", "{port}", *timing]
            found = output(
                [python, "-c", "import crossbar, autobahn; print(crossbar.__version__, autobahn.__version__)"]
            )
            crossbar_version, _, autobahn_version = found.partition(" ")
            versions["crossbar"] = (
                f"Crossbar {crossbar_version} ({venv}), Autobahn {autobahn_version} clients, RawSocket + MessagePack"
            )
            starters["crossbar"] = lambda tmp: start_crossbar(venv, tmp)  # type: ignore[arg-type]
    if "redis" in wanted:
        if not os.access(args.redis_server, os.X_OK):
            skipped["redis"] = f"no redis-server at {args.redis_server} (apt-get install redis-server)"
        else:
            try:
                import hiredis  # noqa: F401  # the subscribers' reply parser
            except ImportError:
                skipped["redis"] = "hiredis is not installed in this Python (pip install hiredis)"
            else:
                commands["redis"] = [sys.executable, "redis_peer.py", "--port", "{port}", *timing]
                words = output([args.redis_server, "--version"]).split()  # "Redis server v=7.0.15 ..."
                versions["redis"] = "Redis " + next((w[2:] for w in words if w.startswith("v=")), "?")
                versions["redis"] += f" ({args.redis_server}); raw RESP client, hiredis parses the replies"
                starters["redis"] = lambda tmp: start_redis(args.redis_server, tmp)
    if "nats" in wanted:
        if not os.access(args.nats_server, os.X_OK):
            skipped["nats"] = f"no nats-server at {args.nats_server} (apt-get install nats-server)"
        else:
            commands["nats"] = [sys.executable, "nats_peer.py", "--port", "{port}", *timing]
            found = output([args.nats_server, "--version"])  # "nats-server: v2.9.10"
            versions["nats"] = f"NATS {found.rpartition(' v')[2]} ({args.nats_server}); raw protocol client"
            starters["nats"] = lambda tmp: start_nats(args.nats_server, tmp)
    if "relay" in wanted:
        versions["relay"] = "pulsyflux/bench/relay.py, in the pulsyflux (CPython) run"
    for column, reason in skipped.items():
        say(f"skipping {COLUMNS[column]}: {reason}")

    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = load()
    say(f"load average {load_before}; {runs} runs, {args.duration} s per measurement")
    results: dict[str, list[dict]] = {c: [] for c in COLUMNS}
    errors: dict[str, list[str]] = {c: [] for c in COLUMNS}
    servers: dict[str, Server] = {}
    with tempfile.TemporaryDirectory(prefix="pulsyflux-peers-") as tmpdir:
        tmp = Path(tmpdir)
        try:
            for column, starter in starters.items():
                say(f"starting {COLUMNS[column]}'s server")
                try:
                    servers[column] = starter(tmp)
                except (OSError, RuntimeError) as error:
                    skipped[column] = f"its server did not start: {error}"
                    say(f"skipping {COLUMNS[column]}: {skipped[column]}")
                    commands.pop(column, None)
            for number in range(1, runs + 1):
                for column, template in commands.items():
                    port = str(servers[column].port) if column in servers else ""
                    argv = [part.replace("{port}", port) for part in template]
                    if column in servers:
                        argv += ["--server-pids", ",".join(map(str, servers[column].pids()))]
                    t0 = time.monotonic()
                    env = checkout if column in ("pulsyflux", "pypy") else dict(os.environ)
                    result = run_peer(argv, env, timeout=60 + 30 * args.duration)
                    took = time.monotonic() - t0
                    if "error" in result:
                        errors[column].append(result["error"])
                        say(f"run {number}/{runs} {COLUMNS[column]}: FAILED {result['error']} ({took:.0f} s)")
                        continue
                    relay = result.pop("relay", None)
                    results[column].append(result)
                    if relay is not None:
                        results["relay"].append(relay)
                    say(f"run {number}/{runs} {COLUMNS[column]}: {brief(result)} ({took:.0f} s)")
        finally:
            for server in servers.values():
                server.stop()
    shown = [c for c in COLUMNS if c in wanted and results[c]]
    for column in wanted:
        if column not in shown and column not in skipped:
            skipped[column] = "every run failed: " + (errors[column][-1] if errors[column] else "no result")
    finished = datetime.datetime.now(datetime.timezone.utc)
    commit = output(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    print(
        f"pulsyflux peers at {commit}: medians of {runs} interleaved runs, {args.duration} s per measurement, "
        f"{started:%Y-%m-%d %H:%M}–{finished:%H:%M} UTC, {os.cpu_count()} CPUs, "
        f"load average {load_before} before, {load()} after"
    )
    print()
    print(table(shown, results))
    print()
    for column in shown:
        failed = len(errors[column])
        note = f"; {failed} of {runs} runs FAILED: {errors[column][-1]}" if failed else ""
        print(f"- {COLUMNS[column]}: {versions.get(column, '?')}{note}")
    for column, reason in skipped.items():
        print(f"- {COLUMNS[column]}: skipped, {reason}; to install: {INSTALL[column]}")
    if args.json:
        document = {
            "started": started.isoformat(),
            "finished": finished.isoformat(),
            "load_before": load_before,
            "load_after": load(),
            "cpus": os.cpu_count(),
            "commit": commit,
            "settings": {"runs": runs, "duration": args.duration, "warmup": args.warmup},
            "versions": versions,
            "skipped": skipped,
            "errors": errors,
            "runs": results,
        }
        Path(args.json).write_text(json.dumps(document, indent=2))
    return 1 if any(errors[c] for c in shown) else 0


if __name__ == "__main__":
    sys.exit(main())
