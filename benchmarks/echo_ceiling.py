"""How fast a 1 MiB echo can go on this machine at all: the kernel's ceiling under the router's topology.

``pulsyflux bench rpc`` echoes 1 MiB through three processes (client -> router ->
provider -> router -> client): four sockets, each byte copied into and out of
the kernel at every one. This script runs the same three-process echo with no
pulsyflux and no Twisted in it, so the figure it gives is what the kernel and
the machine allow, whatever the router does:

* ``twisted``: the bare Twisted relay of ``pulsyflux bench rpc``
  (:mod:`pulsyflux.bench.relay`; it forwards bytes as they arrive);
* ``python cut`` / ``python store``: blocking sockets, one thread per direction,
  forwarding bytes as they arrive (cut-through) or holding each 1 MiB message
  whole before sending it on (store-and-forward, as the router does with frames);
* ``c cut`` / ``c store``: the same in C (``echo_ceiling.c``, compiled with ``cc``
  into a temporary directory if a compiler is there, skipped otherwise);
* ``c direct``: the C client and echo with no relay: two sockets instead of four.

The variants take turns in short slices within each run, so machine noise hits
them alike; the report gives the medians over runs of MB/s (10**6 bytes one
way per second, as the bench reports) and of CPU microseconds per echo by
process, and each variant's ratio to the Twisted relay::

    python benchmarks/echo_ceiling.py --runs 3 --duration 2
    python benchmarks/echo_ceiling.py --only "twisted,c cut" --json out.json

The child roles (``echo``, ``relay``, ``client``, ``twisted-client``) are this
script run with other arguments; docs/performance.md reads the results.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import IO, Any, Optional

SIZE = 1 << 20
SLICE = 0.25  # seconds: each variant's turn within a run
HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = ["twisted", "twisted big", "python loop", "python cut", "python store", "c cut", "c store", "c direct"]


# -- child roles: blocking Python ------------------------------------------------------


def _nodelay(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as pulsyflux and the relay do


def _pump(src: socket.socket, dst: socket.socket, size: int, store: bool) -> None:
    """Copy ``src`` to ``dst`` until ``src`` ends: at once (cut), or ``size`` bytes at a time (store)."""
    buf = bytearray(size)
    view = memoryview(buf)
    have = 0
    while True:
        n = src.recv_into(view[have:])
        if not n:
            break
        if not store:
            dst.sendall(view[:n])
            continue
        have += n
        if have == size:
            dst.sendall(view)
            have = 0
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def _thread(target: Any, *args: Any) -> None:
    threading.Thread(target=target, args=args, daemon=True).start()


def _serve(store: bool, size: int, upstream: Optional[int]) -> None:
    """``echo`` (upstream None) or ``relay``: print the port, serve every connection in threads."""
    listener = socket.create_server(("127.0.0.1", 0))
    print(listener.getsockname()[1], flush=True)
    while True:
        conn, _ = listener.accept()
        _nodelay(conn)
        if upstream is None:
            _thread(_pump, conn, conn, size, store)
        else:
            up = socket.create_connection(("127.0.0.1", upstream))
            _nodelay(up)
            _thread(_pump, conn, up, size, store)
            _thread(_pump, up, conn, size, store)


LOOP_READ = 65536  # bytes per read in the event loop variant: what Twisted reads at a time


class _Pipe:
    """One direction of the event loop variant: bytes read from ``src`` go to ``dst`` at once."""

    def __init__(self, src: socket.socket, dst: socket.socket) -> None:
        self.src, self.dst = src, dst
        self.view = memoryview(bytearray(LOOP_READ))
        self.pending: Optional[memoryview] = None  # what dst has not taken yet; src is not read meanwhile


def _serve_loop(upstream: Optional[int]) -> None:
    """``echo`` or ``relay`` as one thread with non-blocking sockets and epoll, as an event loop does,
    but reading into one buffer and sending from it (no allocation, no join, no write buffer)."""
    import selectors

    selector = selectors.DefaultSelector()
    readers: dict[socket.socket, _Pipe] = {}  # the pipe each socket is the source of
    writers: dict[socket.socket, _Pipe] = {}  # the pipe each socket is the destination of

    def interest(sock: socket.socket) -> None:
        events = 0
        reader, writer = readers.get(sock), writers.get(sock)
        if reader is not None and reader.pending is None:
            events |= selectors.EVENT_READ
        if writer is not None and writer.pending is not None:
            events |= selectors.EVENT_WRITE
        try:
            selector.modify(sock, events) if events else selector.unregister(sock)
        except (KeyError, ValueError):
            if events:
                selector.register(sock, events)

    def send(pipe: _Pipe, data: memoryview) -> None:
        try:
            sent = pipe.dst.send(data)
        except BlockingIOError:
            sent = 0
        pipe.pending = data[sent:] if sent < len(data) else None
        interest(pipe.src)
        interest(pipe.dst)

    def add(src: socket.socket, dst: socket.socket) -> None:
        pipe = _Pipe(src, dst)
        readers[src] = pipe
        writers[dst] = pipe
        interest(src)

    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    selector.register(listener, selectors.EVENT_READ)
    print(listener.getsockname()[1], flush=True)
    while True:
        for key, events in selector.select():
            sock = key.fileobj
            if sock is listener:
                conn, _ = listener.accept()
                _nodelay(conn)
                conn.setblocking(False)
                if upstream is None:
                    add(conn, conn)
                else:
                    up = socket.create_connection(("127.0.0.1", upstream))
                    _nodelay(up)
                    up.setblocking(False)
                    add(conn, up)
                    add(up, conn)
                continue
            assert isinstance(sock, socket.socket)
            if events & selectors.EVENT_WRITE:
                pipe = writers[sock]
                assert pipe.pending is not None
                send(pipe, pipe.pending)
            if events & selectors.EVENT_READ and sock in readers:
                pipe = readers[sock]
                n = sock.recv_into(pipe.view)
                if not n:
                    del readers[sock]
                    interest(sock)
                    continue
                send(pipe, pipe.view[:n])


def _client(size: int, port: int) -> None:
    """Per line ``SECONDS`` on stdin, echo ``size`` bytes one at a time for that long; answer ``COUNT ELAPSED``."""
    sock = socket.create_connection(("127.0.0.1", port))
    _nodelay(sock)
    message = b"x" * size
    go = threading.Semaphore(0)

    def sender() -> None:
        while True:
            go.acquire()
            sock.sendall(message)

    _thread(sender)
    view = memoryview(bytearray(size))
    for line in sys.stdin:
        started = time.perf_counter()
        deadline = started + float(line)
        count = 0
        while True:
            go.release()
            missing = size
            while missing:
                n = sock.recv_into(view[: min(missing, size)], missing)
                if not n:
                    sys.exit("the echo hung up")
                missing -= n
            count += 1
            end = time.perf_counter()
            if end >= deadline:
                break
        print(count, f"{end - started:.6f}", flush=True)


def _twisted_client(size: int, port: int) -> None:
    """The bench's own relay client (RoundTripClient) driven by the same stdin lines."""
    from twisted.internet import reactor, stdio
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
    from twisted.protocols.basic import LineReceiver

    from pulsyflux.bench.relay import RoundTripClient

    class Lines(LineReceiver):
        delimiter = b"\n"

        def __init__(self, client: RoundTripClient) -> None:
            self.client = client

        def lineReceived(self, line: bytes) -> None:
            started = time.perf_counter()

            def done(samples: list) -> None:
                self.transport.write(f"{len(samples)} {time.perf_counter() - started:.6f}\n".encode())

            self.client.run(size, float(line)).addCallback(done)

        def connectionLost(self, reason: Any = None) -> None:
            reactor.stop()

    def connected(client: RoundTripClient) -> None:
        stdio.StandardIO(Lines(client))

    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    connectProtocol(endpoint, RoundTripClient()).addCallback(lambda c: c.connected_d).addCallback(connected)
    reactor.run()


def _twisted_big(argv: list[str]) -> None:
    """The bench's relay and echo (:mod:`pulsyflux.bench.relay`), each connection reading into one reused
    1 MiB buffer (``recv_into``) instead of Twisted's ``recv`` of 64 KiB into a new bytes object, and
    sending from it at once; only what the kernel does not take is copied to Twisted's write buffer.

    What a Twisted process could do with a read path of its own (this reads Twisted privates: a
    measurement, not a design).
    """
    from twisted.internet import main as reasons
    from twisted.internet.protocol import ClientFactory

    from pulsyflux.bench import relay

    def sender(transport: Any) -> Any:
        sock = transport.socket

        def write(data: memoryview) -> None:
            if transport.dataBuffer or transport._tempDataBuffer:
                transport.write(bytes(data))
                return
            try:
                sent = sock.send(data)
            except BlockingIOError:
                sent = 0
            if sent < len(data):
                transport.write(bytes(data[sent:]))

        return write

    def big_reads(transport: Any, protocol: Any) -> None:
        sock = transport.socket
        view = memoryview(bytearray(1 << 20))

        def doRead() -> Any:
            try:
                n = sock.recv_into(view)
            except BlockingIOError:
                return None
            except OSError:
                return reasons.CONNECTION_LOST
            if not n:
                return reasons.CONNECTION_DONE
            protocol.dataReceived(view[:n])
            return None

        transport.doRead = doRead

    class Echo(relay.EchoProtocol):
        def connectionMade(self) -> None:
            relay._low_latency(self.transport)
            self.dataReceived = sender(self.transport)  # type: ignore[method-assign]
            big_reads(self.transport, self)

    class Upstream(relay._Upstream):
        def connectionMade(self) -> None:
            relay._low_latency(self.transport)
            big_reads(self.transport, self)
            self.downstream.upstream_ready(self.transport)

    class Relay(relay.RelayProtocol):
        def connectionMade(self) -> None:
            relay._low_latency(self.transport)
            self.write = sender(self.transport)
            big_reads(self.transport, self)
            factory = ClientFactory.forProtocol(lambda: Upstream(self))
            self.reactor.connectTCP("127.0.0.1", self.upstream_port, factory)  # type: ignore[arg-type]

        def upstream_ready(self, transport: Any) -> None:
            self.upstream_transport = transport
            self.upstream = sender(transport)

    relay.EchoProtocol = Echo  # type: ignore[misc]
    relay.RelayFactory.buildProtocol = lambda self, addr: Relay(self.reactor, self.upstream_port)  # type: ignore[method-assign]
    relay.serve(argv)


# -- the driver ----------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _Process:
    def __init__(self, argv: list[str], name: str) -> None:
        self.name = name
        self.popen = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    @property
    def out(self) -> IO[str]:
        assert self.popen.stdout is not None
        return self.popen.stdout

    def line(self) -> str:
        text = self.out.readline()
        if not text:
            raise RuntimeError(f"{self.name} exited (status {self.popen.wait()})")
        return text.strip()

    def stop(self) -> None:
        if self.name == "client" and self.popen.stdin is not None:
            self.popen.stdin.close()  # a client ends at the end of its input, before its relay goes
            try:
                self.popen.wait(2)
                return
            except subprocess.TimeoutExpired:
                pass
        self.popen.kill()
        self.popen.wait()


class _Variant:
    """Three processes (two for ``c direct``) and the client that drives them through its stdin."""

    def __init__(self, name: str, size: int, binary: Optional[str]) -> None:
        self.name = name
        self.processes: list[_Process] = []
        py, me = sys.executable, os.path.abspath(__file__)
        kind, _, mode = name.partition(" ")
        if kind == "twisted":
            command = [py, me, "twisted-big"] if mode == "big" else [py, "-m", "pulsyflux.bench.relay"]
            echo = [*command, "echo"]
            relay: Optional[list[str]] = [*command, "relay"]
            client = [py, me, "twisted-client", str(size)]
        else:
            command = [binary] if kind == "c" else [py, me]
            store = mode if mode in ("store", "loop") else "cut"
            echo = [*command, "echo", store, str(size)]
            relay = None if mode == "direct" else [*command, "relay", store, str(size)]
            client = [*command, "client", str(size)]
        port = self._start(echo, "echo")
        if relay is not None:
            port = self._start([*relay, port], "relay")
        self.client = _Process([*client, port], "client")
        self.processes.append(self.client)
        self.count = 0
        self.elapsed = 0.0
        self.cpu = {p.name: 0.0 for p in self.processes}

    def _start(self, argv: list[str], name: str) -> str:
        process = _Process(argv, name)
        self.processes.append(process)
        return process.line()

    def slice(self, seconds: float) -> None:
        before = {p.name: _cpu_seconds(p.popen.pid) for p in self.processes}
        assert self.client.popen.stdin is not None
        self.client.popen.stdin.write(f"{seconds}\n")
        self.client.popen.stdin.flush()
        count, elapsed = self.client.line().split()
        for p in self.processes:
            self.cpu[p.name] += _cpu_seconds(p.popen.pid) - before[p.name]
        self.count += int(count)
        self.elapsed += float(elapsed)

    def take(self, size: int) -> dict:
        """This run's figures; the counters start again."""
        result = {
            "mb_per_s": self.count * size / self.elapsed / 1e6 if self.elapsed else 0.0,
            "echoes": self.count,
            "cpu_us": {name: used / max(1, self.count) * 1e6 for name, used in self.cpu.items()},
        }
        self.count, self.elapsed = 0, 0.0
        self.cpu = dict.fromkeys(self.cpu, 0.0)
        return result

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()


def _compile(directory: str) -> Optional[str]:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    binary = os.path.join(directory, "echo_ceiling")
    subprocess.run([compiler, "-O2", "-pthread", "-o", binary, os.path.join(HERE, "echo_ceiling.c")], check=True)
    return binary


def measure(names: list[str], runs: int, duration: float, warmup: float, size: int) -> dict:
    with tempfile.TemporaryDirectory() as directory:
        binary = _compile(directory) if any(n.startswith("c ") for n in names) else None
        skipped = [n for n in names if n.startswith("c ") and binary is None]
        variants = [_Variant(n, size, binary) for n in names if n not in skipped]
        try:
            for variant in variants:
                variant.slice(warmup)
                variant.take(size)
            slices = max(1, round(duration / SLICE))
            all_runs = []
            for number in range(runs):
                for _ in range(slices):
                    for variant in variants:
                        variant.slice(duration / slices)
                one = {v.name: v.take(size) for v in variants}
                all_runs.append(one)
                line = "; ".join(f"{name} {r['mb_per_s']:,.0f} MB/s" for name, r in one.items())
                print(f"run {number + 1}/{runs}: {line}", file=sys.stderr, flush=True)
        finally:
            for variant in variants:
                variant.stop()
    medians = {}
    for variant in variants:
        name = variant.name
        rates = [r[name]["mb_per_s"] for r in all_runs]
        cpu = {p: statistics.median(r[name]["cpu_us"][p] for r in all_runs) for p in all_runs[0][name]["cpu_us"]}
        medians[name] = {"mb_per_s": statistics.median(rates), "cpu_us": cpu}
        if "twisted" in all_runs[0]:
            medians[name]["vs_twisted"] = statistics.median(
                r[name]["mb_per_s"] / r["twisted"]["mb_per_s"] for r in all_runs
            )
    return {
        "options": {"runs": runs, "duration": duration, "size": size, "slice": SLICE},
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "medians": medians,
        "runs": all_runs,
        "skipped": skipped,
    }


def format_report(results: dict) -> str:
    o = results["options"]
    lines = [
        f"echo ceiling: {o['size']:,} B echoed one at a time, {o['runs']} runs x {o['duration']} s per variant, "
        f"interleaved in {o['slice']} s slices ({results['machine']['cpus']} CPUs, Python {results['machine']['python']})",
        f"  {'variant':<14} {'MB/s':>7} {'/ twisted':>9}   CPU us per echo by process",
    ]
    for name, m in results["medians"].items():
        ratio = f"{m['vs_twisted']:.2f}" if "vs_twisted" in m else ""
        cpu = "  ".join(f"{p} {us:,.0f}" for p, us in m["cpu_us"].items())
        lines.append(f"  {name:<14} {m['mb_per_s']:>7,.0f} {ratio:>9}   {cpu}")
    for name in results["skipped"]:
        lines.append(f"  {name:<14} skipped: no C compiler (cc or gcc) on the PATH")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] in (["echo", "loop"], ["relay", "loop"]):
        _serve_loop(int(argv[3]) if argv[0] == "relay" else None)
        return 0
    if argv[:1] in (["echo"], ["relay"]):
        _serve(argv[1] == "store", int(argv[2]), int(argv[3]) if argv[0] == "relay" else None)
        return 0
    if argv[:1] == ["client"]:
        _client(int(argv[1]), int(argv[2]))
        return 0
    if argv[:1] == ["twisted-big"]:
        _twisted_big(argv[1:])
        return 0
    if argv[:1] == ["twisted-client"]:
        _twisted_client(int(argv[1]), int(argv[2]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="repetitions, medians reported (default 3)")
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per variant per run (default 2)")
    parser.add_argument("--warmup", type=float, default=0.5, help="seconds per variant before counting (default 0.5)")
    parser.add_argument("--size", type=int, default=SIZE, help=f"bytes per echo (default {SIZE:,})")
    parser.add_argument(
        "--only", default=",".join(VARIANTS), help=f"comma-separated variants (default all: {', '.join(VARIANTS)})"
    )
    parser.add_argument("--json", metavar="FILE", help="also write every run's numbers to FILE ('-' for stdout)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant {unknown[0]!r}: choose from {', '.join(VARIANTS)}")
    results = measure(names, max(1, args.runs), args.duration, args.warmup, max(1, args.size))
    print(format_report(results))
    if args.json == "-":
        json.dump(results, sys.stdout, indent=2)
        print()
    elif args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
