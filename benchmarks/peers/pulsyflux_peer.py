"""pulsyflux's rows: one run of ``pulsyflux bench rpc`` and one of ``pulsyflux bench pubsub``.

    python benchmarks/peers/pulsyflux_peer.py [--server-python PYPY] [--no-relay] [--duration S --warmup S]

The same code as the ``pulsyflux bench`` commands (pulsyflux.bench.rpc and
pulsyflux.bench.pubsub with ``runs=1`` and their default shapes), so the
numbers are the same measurement. ``--server-python`` runs the router (rpc)
and the server with its broker (pubsub) on another interpreter, PyPy say;
every client -- the consumers, the echo provider, the publisher and the
subscribers, the bare relay and its echo -- stays on this interpreter.
Prints one JSON line (see workload.py for the keys).
"""

from __future__ import annotations

import sys
from typing import Any

import workload

SERVERS = {"router", "server", "server-history"}  # the children that are the server under test


def on_server_python(module: Any, server_python: str, used: dict[str, str]) -> None:
    """Make ``module``'s children that are the server start on ``server_python``, the rest on this one."""
    original = module.spawn

    def spawn(reactor: Any, python: str, name: str, *args: str) -> Any:
        chosen = server_python if name in SERVERS else sys.executable
        used[name] = chosen
        return original(reactor, chosen, name, *args)

    module.spawn = spawn


async def run(reactor: Any, settings: workload.Settings, server_python: str, relay: bool) -> dict:
    from pulsyflux.bench import pubsub, rpc

    used: dict[str, str] = {}
    on_server_python(rpc, server_python, used)
    on_server_python(pubsub, server_python, used)
    duration, warmup = settings.duration, settings.warmup
    rpc_options = rpc.Options(runs=1, duration=duration, warmup=warmup, baseline=relay, python=server_python)
    requests = await rpc.measure(reactor, rpc_options)
    pubsub_options = pubsub.Options(runs=1, duration=duration, warmup=warmup, python=server_python)
    messages = await pubsub.measure(reactor, pubsub_options)
    if requests.get("failed_requests") or messages.get("failed") or messages.get("dropped"):
        raise RuntimeError("requests failed or messages were dropped: see pulsyflux bench rpc / pubsub")
    r, p = requests["medians"], messages["medians"]
    result = {
        "sequential_per_s": r["sequential_req_per_s"],
        "sequential_p50_us": r["sequential_p50_us"],
        "inflight_per_s": r["inflight_req_per_s"],
        "echo_mb_per_s": r["echo_1mib_mb_per_s"],
        "latency_p50_us": p["latency_p50_us"],
        "flood_1_per_s": p["flood_1_deliveries_per_s"],
        "flood_10_per_s": p["flood_10_deliveries_per_s"],
        "inflight_server_cpu_us": r["inflight_cpu_us"].get("router"),
        "interpreters": used,
    }
    for n in (1, 10):  # the server child's CPU share during the flood, per delivery
        share, rate = p.get(f"flood_{n}_cpu_server_percent"), p[f"flood_{n}_deliveries_per_s"]
        result[f"flood_{n}_server_cpu_us"] = share / 100 / rate * 1e6 if share is not None and rate else None
    if relay:
        result["relay"] = {
            "sequential_per_s": r["relay_rt_per_s"],
            "sequential_p50_us": r["relay_p50_us"],
            "echo_mb_per_s": r.get("relay_echo_mb_per_s"),  # the same echo, through the relay, same run
        }
    return result


def main(argv: list[str]) -> int:
    settings, rest = workload.settings_from_argv(argv)
    server_python, relay = sys.executable, True
    items = iter(rest)
    for item in items:
        if item == "--server-python":
            server_python = next(items)
        elif item == "--no-relay":
            relay = False
        else:
            sys.exit("usage: pulsyflux_peer.py [--server-python PYTHON] [--no-relay] [--duration S] [--warmup S]")
    from twisted.internet import reactor

    return workload.main(reactor, lambda: run(reactor, settings, server_python, relay))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
