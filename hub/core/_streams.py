"""Every JetStream stream, KV bucket and hub-owned durable consumer, declared
from one place.

Stream subjects come from the taxonomy (`schemas.subjects.streams()`); only the
retention policy of each stream is decided here. Declaring is idempotent and
safe when several hubs start at once: an existing stream is updated to this
configuration, a concurrent creation is treated as success.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    SubjectTransform,
)
from nats.js.errors import BadRequestError, NotFoundError

from schemas import subjects

from ._logging import kv

log = logging.getLogger("cowork.hub.streams")

DAY = 24 * 3600.0
MIB = 1024 * 1024
GIB = 1024 * MIB


@dataclass(frozen=True)
class StreamLimits:
    """Quotas of every stream and KV bucket the hub declares (HubSettings
    `stream_max_bytes`, `stream_max_msg_size`). Each stream holds at most
    `max_bytes`: a LIMITS stream then drops its oldest messages (discard old), so a
    flood ages out history instead of filling the shared JetStream store and
    refusing every tenant; a message larger than `max_msg_size` is refused."""

    max_bytes: int = GIB
    max_msg_size: int = MIB
    # Not a quota but the same kind of operator setting (HubSettings
    # `event_partitions`): how many partitions a partitioned stream stores.
    event_partitions: int = 1
    # How long a partition lease outlives its holder (HubSettings
    # `partition_lease_seconds`): the CW_HUB_LEASES bucket's max_age.
    lease_seconds: float = 6.0


@dataclass(frozen=True)
class StreamPolicy:
    retention: RetentionPolicy
    max_age_seconds: float
    duplicate_window_seconds: float = 120.0


# Why each: outbound deliveries are a work queue (a message leaves
# the stream once its one consumer acks it); events, inbound, receipts, audit
# and dead letters are kept for replay and inspection.
POLICIES: dict[str, StreamPolicy] = {
    "CW_DEVICE_EVENTS": StreamPolicy(RetentionPolicy.LIMITS, 7 * DAY),
    "CW_CHANNEL_INBOUND": StreamPolicy(RetentionPolicy.LIMITS, 7 * DAY, 600.0),
    "CW_CHANNEL_OUTBOUND": StreamPolicy(RetentionPolicy.WORK_QUEUE, 2 * DAY),
    "CW_CHANNEL_RECEIPTS": StreamPolicy(RetentionPolicy.LIMITS, 7 * DAY),
    "CW_AUDIT": StreamPolicy(RetentionPolicy.LIMITS, 30 * DAY),
    "CW_DEADLETTER": StreamPolicy(RetentionPolicy.LIMITS, 30 * DAY),
}


@dataclass(frozen=True)
class BucketPolicy:
    max_age_seconds: float | None  # None: the partition lease TTL (StreamLimits)
    history: int = 1
    # Read and written by hub replicas only (no edge permission names it), so the
    # hub may delete a message there (a replica leaving takes its keys out at once).
    hub_only: bool = False
    # Its own quota when far below the streams' (JetStream reserves max_bytes).
    max_bytes: int | None = None


# KV buckets, each kept by JetStream in a stream named KV_<bucket>; declared with
# the streams (and checked by readiness) because runtime code may not create them.
# CW_CHANNEL_SENT: each channel instance's sent-ledger (channels/runtime/_sent_store.py),
# so a delivery re-served after a restart is not sent twice; a redelivery never
# comes later than the outbound stream keeps a delivery (2 days).
KV_BUCKETS: dict[str, BucketPolicy] = {
    "CW_CHANNEL_SENT": BucketPolicy(2 * DAY),
    # CW_CHANNEL_LEASES: which process holds each instance's outbound transport
    # (channels/runtime/_transport_state.py); a key lives one lease TTL after its
    # last renewal. CW_CHANNEL_CURSORS: where each transport resumes.
    "CW_CHANNEL_LEASES": BucketPolicy(None, max_bytes=8 * MIB),
    "CW_CHANNEL_CURSORS": BucketPolicy(30 * DAY, max_bytes=64 * MIB),
    # CW_HUB_LEASES: which replica works which partition (hub/core/_leases.py); a
    # key lives one lease TTL after its last renewal.
    "CW_HUB_LEASES": BucketPolicy(None, hub_only=True, max_bytes=8 * MIB),
}


def bucket_stream(bucket: str) -> str:
    return f"KV_{bucket}"


@dataclass(frozen=True)
class ConsumerSpec:
    stream: str
    durable: str
    filter_subject: str
    ack_wait_seconds: float = 30.0
    max_deliver: int = 10
    max_ack_pending: int = 1000
    # Where the consumer starts (a lane, hub/core/_lanes.py); None: the stream's start.
    start_seq: int | None = None
    description: str | None = None


HUB_CONSUMERS: tuple[ConsumerSpec, ...] = (
    ConsumerSpec("CW_AUDIT", "hub-audit", subjects.AUDIT.filter()),
    # Never gives up on an event (-1): a database outage only delays the projection.
    ConsumerSpec(
        "CW_DEVICE_EVENTS",
        "hub-projector",
        subjects.DEVICE_EVENT.filter(),
        max_deliver=-1,
        max_ack_pending=20_000,
    ),
    # Accepted chat messages are never dropped: a database outage only delays them.
    ConsumerSpec(
        "CW_CHANNEL_INBOUND",
        "hub-channel-router",
        subjects.CHANNEL_INBOUND.filter(),
        max_deliver=-1,
        max_ack_pending=20_000,
    ),
    ConsumerSpec(
        "CW_CHANNEL_RECEIPTS",
        "hub-channel-receipts",
        subjects.CHANNEL_RECEIPT.filter(),
        max_deliver=-1,
        max_ack_pending=20_000,
    ),
)


def hub_consumer(durable: str) -> ConsumerSpec:
    """The spec of one hub consumer in the table above, by durable name."""
    return next(spec for spec in HUB_CONSUMERS if spec.durable == durable)


def partition_consumers(partitions: int) -> tuple[ConsumerSpec, ...]:
    """One hub consumer per partition of each partitioned family (none when 1: the
    family's one consumer in HUB_CONSUMERS then reads everything)."""
    if partitions <= 1:
        return ()
    return tuple(
        replace(spec, durable=f"{spec.durable}-p{p}", filter_subject=family.partition_filter(p))
        for spec in HUB_CONSUMERS
        for family in subjects.FAMILIES
        if family.partition_by and spec.filter_subject == family.filter()
        for p in range(partitions)
    )


def hub_consumers(partitions: int = 1) -> tuple[ConsumerSpec, ...]:
    """Every durable consumer the hub declares. With partitions, a partitioned
    family's unpartitioned consumer stays: it drains what was stored before the
    stream was partitioned (its filter matches only subjects without the token)."""
    return HUB_CONSUMERS + partition_consumers(partitions)


def _transforms(partitions: int) -> dict[str, SubjectTransform]:
    if partitions <= 1:
        return {}
    out = {}
    for family in subjects.FAMILIES:
        if family.partition_by and family.stream:
            src, dest = family.partition_transform(partitions)
            out[family.stream] = SubjectTransform(src=src, dest=dest)
    return out


def stream_configs(replicas: int = 1, limits: StreamLimits = StreamLimits()) -> list[StreamConfig]:
    declared = subjects.streams()
    missing = set(declared) ^ set(POLICIES)
    if missing:  # a family names a stream without a policy, or the reverse
        raise RuntimeError(f"stream policy table out of step with the taxonomy: {sorted(missing)}")
    transforms = _transforms(limits.event_partitions)
    return [
        StreamConfig(
            name=name,
            subjects=list(subject_filters),
            subject_transform=transforms.get(name),
            retention=POLICIES[name].retention,
            storage=StorageType.FILE,
            num_replicas=replicas,
            max_age=POLICIES[name].max_age_seconds,
            duplicate_window=POLICIES[name].duplicate_window_seconds,
            max_msg_size=limits.max_msg_size,
            max_bytes=limits.max_bytes,
            discard=DiscardPolicy.OLD,
            allow_direct=True,
        )
        for name, subject_filters in sorted(declared.items())
    ]


def bucket_configs(replicas: int = 1, limits: StreamLimits = StreamLimits()) -> list[StreamConfig]:
    """The streams behind KV_BUCKETS, configured as nats-py's create_key_value does
    (subjects $KV.<bucket>.>, one value per key, no deletes of the stream's
    messages by API) plus direct gets, which the instances read with, but without
    rollups: the tenants' principals share a bucket, and one `Nats-Rollup: all`
    on an instance's own key would erase every tenant's keys. A put replaces only
    its own key (one value per subject); purging is the hub's (JetStream API).
    A hub-only bucket allows deleting a message by sequence."""
    return [
        _bucket_config(bucket, policy, replicas, limits)
        for bucket, policy in sorted(KV_BUCKETS.items())
    ]


def _bucket_config(
    bucket: str, policy: BucketPolicy, replicas: int, limits: StreamLimits
) -> StreamConfig:
    max_age = policy.max_age_seconds or limits.lease_seconds
    return StreamConfig(
        name=bucket_stream(bucket),
        subjects=[f"$KV.{bucket}.>"],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        num_replicas=replicas,
        max_age=max_age,
        max_msgs_per_subject=policy.history,
        max_msg_size=limits.max_msg_size,
        max_bytes=min(policy.max_bytes or limits.max_bytes, limits.max_bytes),
        max_msgs=-1,
        max_consumers=-1,
        duplicate_window=min(120.0, max_age),
        discard=DiscardPolicy.NEW,
        allow_rollup_hdrs=False,
        deny_delete=not policy.hub_only,
        allow_direct=True,
    )


def consumer_config(spec: ConsumerSpec) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=spec.durable,
        description=spec.description,
        filter_subject=spec.filter_subject,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL
        if spec.start_seq is None
        else DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=spec.start_seq,
        ack_wait=spec.ack_wait_seconds,
        max_deliver=spec.max_deliver,
        max_ack_pending=spec.max_ack_pending,
    )


async def declare(
    js: JetStreamContext, replicas: int = 1, limits: StreamLimits = StreamLimits()
) -> None:
    """Create or update every stream and hub consumer to the configuration above."""
    for config in stream_configs(replicas, limits) + bucket_configs(replicas, limits):
        await _declare_stream(js, config)
    for spec in hub_consumers(limits.event_partitions):
        await js.add_consumer(spec.stream, await _kept_start(js, spec, consumer_config(spec)))


async def _kept_start(
    js: JetStreamContext, spec: ConsumerSpec, config: ConsumerConfig
) -> ConsumerConfig:
    """A consumer that was rewound (`rewind_unacked`) keeps its start: JetStream
    cannot change where a consumer starts, and rewinding it is not a drift."""
    try:
        info = await js.consumer_info(spec.stream, spec.durable)
    except NotFoundError:
        return config
    if info.config.deliver_policy != DeliverPolicy.BY_START_SEQUENCE:
        return config
    return replace(
        config,
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=info.config.opt_start_seq,
    )


async def rewind_unacked(js: JetStreamContext, spec: ConsumerSpec) -> int | None:
    """Make the messages a previous worker of `spec` fetched and never acked come
    next, in stream order, instead of after its ack wait (when newer messages
    would already have gone past them): the consumer is recreated to start at its
    ack floor. Messages acked above the floor come again; the worker must drop
    what it has already done (the projector drops event ids it has projected).
    On a work queue (channel deliveries) an acked message is gone from the
    stream, and JetStream allows only deliver-all there: the consumer is
    recreated as it was and starts at its first unacked message, which is the
    same place with nothing done coming again.
    Returns the new start sequence, or None when nothing was left in flight."""
    info = await js.consumer_info(spec.stream, spec.durable)
    if not info.num_ack_pending and not info.num_redelivered:
        return None
    start = max((info.ack_floor.stream_seq if info.ack_floor else 0) + 1, spec.start_seq or 1)
    config = consumer_config(spec)  # (all worked out before the consumer goes)
    policy = POLICIES.get(spec.stream)
    if policy is None or policy.retention is not RetentionPolicy.WORK_QUEUE:
        config = replace(
            config, deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start
        )
    await js.delete_consumer(spec.stream, spec.durable)
    await js.add_consumer(spec.stream, config)
    log.info("consumer.rewound", **kv(consumer=spec.durable, start=start))
    return start


async def _declare_stream(js: JetStreamContext, config: StreamConfig) -> None:
    if config.name is None:  # stream_configs and bucket_configs name every stream
        raise ValueError(f"a stream to declare needs a name: {config}")
    try:
        await js.stream_info(config.name)
    except NotFoundError:
        try:
            await js.add_stream(config)
            log.info("stream.created", **kv(stream=config.name, subjects=config.subjects))
            return
        except BadRequestError as exc:
            if exc.err_code != 10058:  # 10058: name in use: another hub won the race
                raise
    await js.update_stream(config)


async def missing_streams(js: JetStreamContext) -> list[str]:
    missing = []
    for name in sorted(POLICIES) + [bucket_stream(b) for b in sorted(KV_BUCKETS)]:
        try:
            await js.stream_info(name)
        except NotFoundError:
            missing.append(name)
    return missing
