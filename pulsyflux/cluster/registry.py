"""Which server holds which channel, kept in Redis under a lease per server.

Each server writes the channels its own providers are registered on to a
set of its own (``<prefix>chans:<node>``) and keeps a key alive
(``<prefix>node:<node>``, renewed every ``lease / 3`` s, expiring after
``lease``). Every ``lease / 3`` s each server reads every live server's set
and tells the request forwarder what appeared and what went; a change is
also announced on ``<prefix>registry`` so that the others hear it at once
rather than at their next read. A server whose key expired (killed, hung,
cut off) is gone for everyone within ``lease`` plus one read, its channels
with it. Channel ids are stored in Redis: Redis is part of the cluster, to
be protected like the servers (a password, TLS, a private network).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

from twisted.internet.defer import DeferredList, FirstError, ensureDeferred, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from .link import RedisLink
from .redis import RedisError, RedisLost
from .shape import check_node_name

__all__ = ["Registry"]

log = Logger()

DEFAULT_LEASE = 3.0
# Channels of other servers one server relays to (each relay is an in-process provider connection).
MAX_REMOTE_CHANNELS = 10_000
MAX_REMOTE_GROUPS = 10_000  # queue groups of other servers kept track of, all of them together
MAX_NODES = 1000  # other servers one server reads (four Redis reads each, every lease / 3)
# The sets are read a page at a time (SSCAN), and no further than these bounds (the node set: 4 x
# MAX_NODES names, bad ones included): whoever can write to Redis can make a set of millions of
# members, and this server reads no more of it than it could use. A known server whose name a read
# did not reach is not taken for gone: its lease key is read directly.
SCAN_COUNT = 1000  # members asked per page (Redis's hint: a small set comes whole)
LEASE_BYTES = 64  # the first bytes of a lease key read (an incarnation is 16)


class Registry:
    """This server's channels in Redis, and a copy of everyone else's."""

    def __init__(
        self,
        link: RedisLink,
        node: str,
        reactor: IReactorTime,
        on_gain: Callable[[str, bytes], None],
        on_lose: Callable[[str, bytes], None],
        *,
        on_groups: Optional[Callable[[], None]] = None,
        on_gone: Optional[Callable[[str], None]] = None,
        prefix: str,
        lease: float = DEFAULT_LEASE,
    ) -> None:
        self.link = link
        self.node = node
        self.reactor = reactor
        self.on_gain = on_gain
        self.on_lose = on_lose
        self.prefix = prefix
        self.lease = lease
        self.on_groups = on_groups
        self.on_gone = on_gone
        # Written in our lease key: a server restarted under the same name has another, so the
        # others forget what they were doing with its previous life.
        self.incarnation = os.urandom(8).hex().encode("ascii")
        self.incarnations: dict[str, bytes] = {}
        self.bad_nodes = 0  # names in the node set that are no node name, or whose keys are not a server's (skipped)
        self.not_relayed = 0  # channels held elsewhere and not relayed (past MAX_REMOTE_CHANNELS), at the last read
        self.sets_read_in_part = 0  # sets not read to their end at the last read (a bound was reached)
        self.held: set[bytes] = set()
        self.remote: dict[str, set[bytes]] = {}  # live server -> the channels it holds
        # Queue groups with members: ours, and every live server's ("pattern\0group").
        self.groups: set[bytes] = set()
        self.remote_groups: dict[str, set[bytes]] = {}
        self.announcements = (prefix + "registry").encode("utf-8")
        self._loop = LoopingCall(self.tick)
        self._loop.clock = reactor
        self._reading = False
        self._read_again = False
        self.heard = 0  # announcements from other servers

    def _key(self, kind: str, node: str) -> bytes:
        return f"{self.prefix}{kind}:{node}".encode()

    # -- ours -----------------------------------------------------------------

    def hold(self, channel: bytes) -> None:
        self.held.add(channel)
        if self.link.up:
            self.link.execute(b"SADD", self._key("chans", self.node), channel).addErrback(lambda _: None)
            self._announce(b"+", channel)

    def release(self, channel: bytes) -> None:
        self.held.discard(channel)
        if self.link.up:
            self.link.execute(b"SREM", self._key("chans", self.node), channel).addErrback(lambda _: None)
            self._announce(b"-", channel)

    def hold_group(self, key: bytes) -> None:
        self.groups.add(key)
        if self.link.up:
            self.link.execute(b"SADD", self._key("groups", self.node), key).addErrback(lambda _: None)
            self._announce(b"+", b"")

    def release_group(self, key: bytes) -> None:
        self.groups.discard(key)
        if self.link.up:
            self.link.execute(b"SREM", self._key("groups", self.node), key).addErrback(lambda _: None)
            self._announce(b"-", b"")

    def _announce(self, sign: bytes, channel: bytes) -> None:
        data = sign + self.node.encode("utf-8") + b"\n" + channel
        self.link.execute(b"SPUBLISH", self.announcements, data).addErrback(lambda _: None)

    def _publish_all(self) -> None:
        """Our whole state again (after a (re)connect: Redis may have lost it, or restarted empty)."""
        chans = self._key("chans", self.node)
        groups = self._key("groups", self.node)
        commands: list[tuple[Any, ...]] = [(b"DEL", chans, groups)]
        if self.held:
            commands.append((b"SADD", chans, *self.held))
        if self.groups:
            commands.append((b"SADD", groups, *self.groups))
        for command in commands:
            self.link.execute(*command).addErrback(lambda _: None)
        self._heartbeat()
        self._announce(b"!", b"")

    def _heartbeat(self) -> None:
        lease_ms = int(self.lease * 1000)
        self.link.execute(b"SET", self._key("node", self.node), self.incarnation, b"PX", lease_ms).addErrback(
            lambda _: None
        )
        self.link.execute(b"SADD", (self.prefix + "nodes").encode("utf-8"), self.node).addErrback(lambda _: None)

    # -- life -----------------------------------------------------------------

    def start(self) -> None:
        self.link.subscribe(self.announcements)
        self._loop.start(self.lease / 3, now=False)

    def stop(self) -> Any:
        if self._loop.running:
            self._loop.stop()
        if not self.link.up:
            return None
        # Leave at once rather than after the lease: the others stop routing here now.
        done = [
            self.link.execute(
                b"DEL", self._key("node", self.node), self._key("chans", self.node), self._key("groups", self.node)
            ),
            self.link.execute(b"SREM", (self.prefix + "nodes").encode("utf-8"), self.node),
        ]
        self._announce(b"!", b"")
        return DeferredList(done, consumeErrors=True)

    def state(self, up: bool) -> None:
        if up:
            self._publish_all()
            self.tick()
        else:
            for node in list(self.remote):
                self._forget(node)  # cross-server requests fail fast while the link is down

    def message(self, data: bytes) -> None:
        """An announcement: read everything again soon (now), rather than trust its details."""
        newline = data.find(b"\n")
        if newline <= 1:
            return
        if data[1:newline].decode("utf-8", "replace") == self.node:
            return
        self.heard += 1
        self.read()  # no heartbeat: a flood of announcements costs one read at a time, nothing more

    # -- theirs ---------------------------------------------------------------

    def tick(self) -> None:
        if not self.link.up:
            return
        self._heartbeat()
        self.read()

    def read(self) -> None:
        """Read every live server's channels; asked while reading, once more when done (nothing missed)."""
        if not self.link.up:
            return
        if self._reading:
            self._read_again = True
            return
        self._reading = True
        self._read_again = False
        d = ensureDeferred(self._read_all())
        d.addErrback(lambda _: None)  # a failed read changes nothing; the next one will tell
        d.addBoth(self._done_reading)

    def _done_reading(self, _: Any) -> None:
        self._reading = False
        if self._read_again:
            self.read()

    async def _scan(self, key: bytes, budget: int) -> tuple[list[bytes], bool]:
        """At most ``budget`` members of the set at ``key``, a page at a time; and whether that was all of it."""
        members: list[bytes] = []
        cursor: Any = b"0"
        while len(members) < budget:
            reply = await self.link.execute(b"SSCAN", key, cursor, b"COUNT", min(SCAN_COUNT, budget - len(members)))
            cursor, page = reply
            members.extend(page)
            if cursor == b"0":
                if len(members) <= budget:
                    return members, True
                break
        return members[:budget], False

    async def _read_all(self) -> None:
        """Every live server's channels and groups, within the bounds; then what changed is told."""
        names, whole = await self._scan((self.prefix + "nodes").encode("utf-8"), 4 * MAX_NODES)
        cut = 0 if whole else 1
        others: list[str] = []
        for member in names:
            try:
                node = member.decode("utf-8")
                check_node_name(node)
            except ValueError:  # UnicodeDecodeError too: not written by a pulsyflux server
                self.bad_nodes += 1
                continue
            if node != self.node:
                others.append(node)
        if not whole:
            # Servers we know whose names this read did not reach (SSCAN's order is the hash's, and a
            # writer may bury them under junk names): their lease key tells whether they are still there.
            read = set(others)
            others.extend(node for node in self.remote if node not in read)
        if len(others) > MAX_NODES:
            # Known servers first (len(self.remote) <= MAX_NODES): a new name does not push one out.
            others = sorted(set(others), key=lambda node: (node not in self.remote, node))[:MAX_NODES]
        leases = await DeferredList(
            [self.link.execute(b"GETRANGE", self._key("node", n), 0, LEASE_BYTES - 1) for n in others],
            consumeErrors=True,
        )
        channels_left, groups_left = MAX_REMOTE_CHANNELS, MAX_REMOTE_GROUPS
        state: dict[str, set[bytes]] = {}
        group_state: dict[str, set[bytes]] = {}
        partial: set[str] = set()  # servers whose channels were not all read: what was not read is not lost
        alive: list[tuple[str, bytes]] = []
        gone: list[str] = []
        for node, (ok, lease) in zip(others, leases):
            if not ok:
                if _refused(lease.value):
                    self.bad_nodes += 1  # its lease key is no string: not a server's
                    continue
                return  # a failed read changes nothing; the next one will tell
            if lease:
                alive.append((node, lease))
            else:
                gone.append(node)
        elsewhere = 0  # channels the live servers hold, as their sets count them (read or not)
        for node, lease in list(alive):  # one server at a time: what is held at once stays within the bounds
            try:
                size, (channels, channels_whole), (groups, groups_whole) = await gatherResults(
                    [
                        self.link.execute(b"SCARD", self._key("chans", node)),
                        ensureDeferred(self._scan(self._key("chans", node), channels_left)),
                        ensureDeferred(self._scan(self._key("groups", node), groups_left)),
                    ],
                    consumeErrors=True,
                )
            except FirstError as error:
                if not _refused(error.subFailure.value):
                    raise
                self.bad_nodes += 1  # a set of its is no set: not a server's (skipped, not the whole read)
                alive.remove((node, lease))
                continue
            elsewhere += size
            channels_left -= len(channels)
            groups_left -= len(groups)
            cut += (not channels_whole) + (not groups_whole)
            if not channels_whole:
                partial.add(node)
            state[node] = set(channels)
            group_state[node] = set(groups)
        for node, lease in alive:
            if self.incarnations.get(node, lease) != lease:
                self._forget(node)  # restarted under the same name: its old requests are lost
            self.incarnations[node] = lease
        self.sets_read_in_part = cut
        self._update(state, partial)
        self.not_relayed = max(0, elsewhere - sum(len(c) for c in self.remote.values()))
        self._update_groups(group_state)
        for node in gone:  # expired: tidy up for everyone
            self.link.execute(b"SREM", (self.prefix + "nodes").encode("utf-8"), node).addErrback(lambda _: None)

    def _update_groups(self, state: dict[str, set[bytes]]) -> None:
        if state != self.remote_groups:
            self.remote_groups = state
            if self.on_groups is not None:
                self.on_groups()

    def _update(self, state: dict[str, set[bytes]], partial: frozenset[str] | set[str] = frozenset()) -> None:
        """``state``: each live server's channels as read; those of ``partial`` servers were not all read,
        so a channel missing there is not taken for gone."""
        for node in list(self.remote):
            if node not in state:
                self._forget(node)
        total = sum(len(c) for c in self.remote.values())
        for node, channels in state.items():
            known = self.remote.setdefault(node, set())
            for channel in () if node in partial else known - channels:
                known.discard(channel)
                total -= 1
                self.on_lose(node, channel)
            for channel in channels - known:
                if len(channel) != 16:
                    continue
                if total >= MAX_REMOTE_CHANNELS:
                    continue  # counted in /stats (not_relayed), not lost without a trace
                known.add(channel)
                total += 1
                self.on_gain(node, channel)

    def _forget(self, node: str) -> None:
        self.incarnations.pop(node, None)
        for channel in self.remote.pop(node, set()):
            self.on_lose(node, channel)
        if self.on_gone is not None:
            self.on_gone(node)
        if self.remote_groups.pop(node, None) is not None and self.on_groups is not None:
            self.on_groups()

    def stats(self) -> dict[str, Any]:
        return {
            "nodes": sorted(self.remote)[:100],
            "nodes_count": len(self.remote) + 1,
            "channels_held": len(self.held),
            "channels_elsewhere": sum(len(c) for c in self.remote.values()),
            "bad_nodes": self.bad_nodes,
            "channels_not_relayed": self.not_relayed,
            "sets_read_in_part": self.sets_read_in_part,
        }


def _refused(error: BaseException) -> bool:
    """Redis answered the command with an error (WRONGTYPE: a key another writer gave another type), as
    opposed to the link failing: the server it concerns is skipped, not the whole read."""
    return isinstance(error, RedisError) and not isinstance(error, RedisLost)
