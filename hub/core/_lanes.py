"""Lanes: a key over its rate leaves the shared line and waits in a lane of its own.

A partition's consumer (the *line*) delivers every Desktop of the partition in
stream order, so a Desktop sending faster than its rate would hold up everyone
who hashes into the same partition. When a key (a Desktop) has spent its rate's
tokens, its messages leave the line: a durable consumer of its own (a *lane*,
filtered to the key's subjects, starting at the first message moved aside) takes
them, paced at the key's rate, while the line acks that key's messages without
handling them and goes on with everyone else. A lane that has caught up (nothing
left to fetch, and everything the line passed over is done) closes, and the key
is handled in line again.

Order per key holds: a lane starts only once the line has settled everything
before the lane's first message, and the key goes back in line only after its
lane has done everything the line passed over. Nothing is lost: the line acks a
key's message only after the lane's consumer exists on the server, durable, so a
replica taking the partition over finds the lanes by name and resumes them. A
message done twice (the line reaching a message its closed lane already did) is
acked without handling, or dropped by the handler (the projector's event ids).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from functools import partial

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import APIError, NotFoundError

from ._background import BackgroundTask, pull_forever
from ._logging import kv
from ._rate_limit import RateLimiter
from ._streams import ConsumerSpec, consumer_config, rewind_unacked

Key = tuple[str, ...]
LANE_BATCH = 100
LANE_GIVE_WAY = 1.0  # seconds a lane batch waits at most for its line's backlog


def stored(msg: Msg) -> tuple[int, float]:
    """A JetStream message's stream sequence and when it was stored (seconds since
    the epoch), read from its ack subject where `msg.metadata` reads them, without
    building the metadata (a datetime and three objects a message: about 7% of the
    projector's CPU, docs/performance.md, relay round 8). Anything but the two
    subject forms nats-py knows goes through `msg.metadata` itself (which raises
    for a message that is not JetStream's)."""
    tokens = msg.reply.split(".") if msg.reply else []
    if tokens[:2] == ["$JS", "ACK"]:
        if len(tokens) == _V1_TOKENS:
            return int(tokens[5]), int(tokens[7]) / 1e9
        if len(tokens) >= _V2_TOKENS:
            return int(tokens[Msg.Ack.StreamSeq]), int(tokens[Msg.Ack.Timestamp]) / 1e9
    metadata = msg.metadata
    return metadata.sequence.stream, metadata.timestamp.timestamp()


_V1_TOKENS, _V2_TOKENS = 9, 11  # (nats-py's: $JS.ACK.<stream>... and with a domain)


@dataclass
class _Lane:
    key: Key
    spec: ConsumerSpec
    passed: int  # the highest sequence the line acked for this lane
    done: int = 0  # the highest sequence the lane has settled
    task: BackgroundTask | None = None

    @property
    def start(self) -> int:
        return self.spec.start_seq or 1


@dataclass(frozen=True)
class LanePolicy:
    """A key's rate (messages per second, bursts up to `burst`) and how many lanes
    one line may have open; beyond that, keys over their rate wait in line."""

    rate: float
    burst: float
    max_lanes: int = 16


class Lanes:
    """The lanes of one line (`line`: the shared consumer's spec)."""

    def __init__(
        self,
        js: JetStreamContext,
        line: ConsumerSpec,
        policy: LanePolicy,
        *,
        key_of: Callable[[Msg], Key | None],
        filter_of: Callable[[Key], str],
        handle: Callable[[list[Msg]], Awaitable[None]],
        may_fetch: Callable[[], bool],
        log: logging.Logger,
        on_change: Callable[[int, int], None] = lambda lanes, moved: None,
    ) -> None:
        self._js, self._line, self._policy = js, line, policy
        self._key_of, self._filter_of, self._handle = key_of, filter_of, handle
        self._may_fetch, self._log, self._on_change = may_fetch, log, on_change
        # Whether a key is over its rate is judged by when its messages were stored
        # (their JetStream timestamps), not by how fast the line gets to them: a line
        # slower than the rate (a flood of dead letters) would otherwise never find
        # the flooder over it, and everyone would wait behind its backlog in line.
        self._arrivals = RateLimiter(policy.rate, policy.burst)
        # A lane's pace, in real time (emptied when the lane opens: the key has
        # spent its burst).
        self._limiter = RateLimiter(policy.rate, policy.burst)
        self._lanes: dict[Key, _Lane] = {}
        self._closed: dict[Key, int] = {}  # a closed lane's last done sequence
        self._settled = 0  # the line has settled every sequence up to this one
        self._line_behind = False  # the line's last batch left more to fetch

    @property
    def open(self) -> int:
        return len(self._lanes)

    def name(self, key: Key) -> str:
        digest = hashlib.sha256("\x1f".join(key).encode()).hexdigest()[:20]
        return f"{self._line.durable}-lane-{digest}"

    async def restore(self) -> None:
        """Resume the lanes a previous holder of the line left (before the line's
        worker starts); each waits until the line has settled what precedes it."""
        info = await self._js.consumer_info(self._line.stream, self._line.durable)
        self._settled = info.ack_floor.stream_seq if info.ack_floor else 0
        if not info.num_ack_pending and info.delivered:
            # Nothing in flight: all the line was given is settled (its ack floor may
            # lag behind, at the last message of its filter before others' subjects).
            self._settled = max(self._settled, info.delivered.stream_seq)
        prefix = f"{self._line.durable}-lane-"
        offset = 0
        while True:
            page = await self._js.consumers_info(self._line.stream, offset=offset)
            for consumer in page:
                config = consumer.config
                if consumer.name.startswith(prefix) and config.description:
                    key = tuple(json.loads(config.description))
                    spec = self._spec(key, config.opt_start_seq or 1)
                    done = consumer.ack_floor.stream_seq if consumer.ack_floor else 0
                    self._lanes[key] = _Lane(key, spec, passed=done, done=done)
            if len(page) < 256:
                break
            offset += len(page)
        self._start_ready()

    async def handle(self, msgs: list[Msg]) -> None:
        """The line's handler: a key with a lane (or over its rate: a lane is
        opened) is acked and left to its lane; the rest is handled in line."""
        direct: list[Msg] = []
        passed: list[Msg] = []
        opened: list[_Lane] = []
        for msg in msgs:
            seq, stored_at = stored(msg)
            key = self._key_of(msg)
            lane = self._lanes.get(key) if key is not None else None
            if key is None:
                direct.append(msg)
            elif self._closed.get(key, 0) >= seq:
                passed.append(msg)  # its lane did it before closing
            elif lane is not None and seq >= lane.start:
                lane.passed = max(lane.passed, seq)  # (before any await: see _caught_up)
                passed.append(msg)
            elif lane is None and self._over_rate(key, stored_at):
                lane = self._lanes[key] = _Lane(key, self._spec(key, seq), passed=seq)
                opened.append(lane)
                passed.append(msg)
            else:
                direct.append(msg)
        if opened:
            await self._create(opened, passed, direct)
            self._on_change(self.open, 0)
        for m in passed:  # (a buffered publish each: no task per ack, the line's hot path)
            await m.ack()
        if passed:
            self._on_change(self.open, len(passed))
        if direct:
            await self._handle(direct)
        self._settled = max(self._settled, msgs[-1].metadata.sequence.stream)
        self._line_behind = msgs[-1].metadata.num_pending > 0
        self._start_ready()

    async def stop(self) -> None:
        """Stop every lane's worker (the line's lease went); their consumers stay for
        the next holder."""
        lanes, self._lanes = list(self._lanes.values()), {}
        self._closed.clear()
        await asyncio.gather(*(lane.task.stop() for lane in lanes if lane.task))
        self._on_change(0, 0)

    def _over_rate(self, key: Key, stored_at: float) -> bool:
        if self._arrivals.take(key, stored_at) == 0.0:
            self._closed.pop(key, None)
            return False
        if len(self._lanes) >= self._policy.max_lanes:
            return False
        self._limiter.take(key, cost=self._policy.burst)
        return True

    def _spec(self, key: Key, start: int) -> ConsumerSpec:
        return replace(
            self._line,
            durable=self.name(key),
            filter_subject=self._filter_of(key),
            start_seq=start,
            description=json.dumps(list(key)),
            max_ack_pending=LANE_BATCH * 2,
        )

    async def _create(self, opened: list[_Lane], passed: list[Msg], direct: list[Msg]) -> None:
        """Create the new lanes' consumers. One the server refuses (a consumer limit)
        is not opened: its messages go back in line. NATS away: none is opened and
        the batch is handed again."""
        for i, lane in enumerate(opened):
            try:
                await self._js.add_consumer(lane.spec.stream, consumer_config(lane.spec))
            except APIError as exc:
                self._log.warning("lane.refused", **kv(lane=lane.spec.durable, error=str(exc)))
                del self._lanes[lane.key]
                moved = [m for m in passed if self._key_of(m) == lane.key]
                passed[:] = [m for m in passed if m not in moved]
                direct[:] = sorted(direct + moved, key=lambda m: m.metadata.sequence.stream)
            except BaseException:
                for later in opened[i:]:
                    self._lanes.pop(later.key, None)
                raise
            else:
                self._log.info("lane.opened", **kv(lane=lane.spec.durable, start=lane.start))

    def _start_ready(self) -> None:
        for lane in self._lanes.values():
            if lane.task is None and lane.start - 1 <= self._settled:
                lane.task = BackgroundTask(lane.spec.durable, partial(self._run, lane))
                lane.task.start()

    async def _run(self, lane: _Lane) -> None:
        # What a previous holder fetched and never acked comes first, in order.
        while True:
            try:
                await rewind_unacked(self._js, lane.spec)
                break
            except NotFoundError:
                break  # (created just now by add_consumer: it is there; gone: nothing left)
            except Exception as exc:  # NATS away: try again
                self._log.warning(
                    "lane.rewind_failed", **kv(lane=lane.spec.durable, error=str(exc))
                )
                await asyncio.sleep(0.5)
        await pull_forever(
            self._js,
            lane.spec,
            LANE_BATCH,
            partial(self._paced, lane),
            self._log,
            "lane.fetch_failed",
            fetch_seconds=0.5,
            may_fetch=self._may_fetch,
            ordered=True,
            until_idle=partial(self._caught_up, lane),
        )
        self._log.info("lane.closed", **kv(lane=lane.spec.durable, done=lane.done))
        try:
            await self._js.delete_consumer(lane.spec.stream, lane.spec.durable)
        except NotFoundError:
            pass
        except Exception as exc:  # a leftover lane is resumed, and closes, by the next holder
            self._log.warning("lane.delete_failed", **kv(lane=lane.spec.durable, error=str(exc)))

    async def _paced(self, lane: _Lane, msgs: list[Msg]) -> None:
        """A lane goes at its key's rate, and gives way to its line: while the line
        has a backlog (a flood it passes over), a lane batch waits for it up to
        LANE_GIVE_WAY seconds. Every batch of the lane costs the process's one
        thread (a dead letter is about 0.5 ms), and the line waits for its turns
        (docs/performance.md, "Same partition: lanes")."""
        while (wait := self._limiter.take(lane.key, cost=len(msgs))) > 0:
            await asyncio.sleep(wait)
        waited = 0.0
        while self._line_behind and waited < LANE_GIVE_WAY:
            await asyncio.sleep(0.02)
            waited += 0.02
        await self._handle(msgs)
        lane.done = max(lane.done, msgs[-1].metadata.sequence.stream)

    def _caught_up(self, lane: _Lane) -> bool:
        """Nothing left to fetch: close if the lane has done all the line passed over
        (decided without an await, so the line cannot pass one more meanwhile)."""
        if lane.done < lane.passed or self._lanes.get(lane.key) is not lane:
            return False
        del self._lanes[lane.key]
        self._closed[lane.key] = lane.done
        self._on_change(self.open, 0)
        return True
