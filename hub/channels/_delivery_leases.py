"""Which hub replica runs each channel instance's delivery worker: one at a time.

A lane (instance, chat, thread) keeps its order only if one worker sends it, so
the instances' delivery workers are partitions of their own (group `channels` of
hub/core/_leases.py, one lease per instance the replicas host): a replica runs
the workers of the instances whose lease it holds, a fair share of them. Webhook
ingress is not leased: every replica answers every instance's webhooks.

When a replica gains an instance its consumer is first rewound
(`streams.rewind_unacked`): what a dead holder fetched and never acked comes
next, in stream order, instead of after the 30 s ack wait behind newer
deliveries of the same lanes. A delivery the dead holder had sent is then
answered from the durable sent-ledger (CW_CHANNEL_SENT) as a duplicate, not
sent again.
"""

from __future__ import annotations

import logging

from nats.js import JetStreamContext

from channels import ChannelRuntime

from ..core import BackgroundTask, HubMetrics, PartitionLeases, streams
from ._bus_access import consumer_name, consumer_spec

log = logging.getLogger("cowork.hub.channels.leases")

GROUP = "channels"


class DeliveryLeases:
    def __init__(
        self,
        js: JetStreamContext,
        runtime: ChannelRuntime,
        metrics: HubMetrics,
        *,
        replica: str,
    ) -> None:
        self._js, self._runtime, self._metrics = js, runtime, metrics
        self._tenants: dict[str, str] = {}  # hosted instance id -> its tenant
        self._leases = PartitionLeases(
            js,
            GROUP,
            [],
            replica=replica,
            on_gain=self._gain,
            on_lose=self._lose,
            log=log,
            # None needed (the projector's waits out its last pull): a delivery
            # worker's stop returns once its last pull has expired, or after it
            # unsubscribed the pull's inbox, and JetStream gives nothing to a pull
            # request nobody listens to. So the lease is free as soon as it stops.
            handover_delay=0.0,
        )
        self._leasing = BackgroundTask("channel-delivery:leases", self._leases.run)

    def start(self) -> None:
        self._leasing.start()

    async def stop(self) -> None:
        await self._leasing.stop()
        await self._leases.release_all()

    def host(self, tenants: dict[str, str]) -> None:
        """The instances this replica hosts (id -> tenant): the lease names."""
        # Kept after an instance goes: a lease taken just before still needs its
        # consumer (a deleted one's rewind fails, and the lease is handed back).
        self._tenants.update(tenants)
        self._leases.set_names(sorted(tenants))

    async def _gain(self, instance_id: str) -> None:
        spec = consumer_spec(self._tenants[instance_id], instance_id)
        await streams.rewind_unacked(self._js, spec)
        await self._runtime.start_delivery(instance_id, sure=lambda: self._leases.sure(instance_id))
        self._metrics.partition_leases.labels(consumer_name(instance_id)).set(1)

    async def _lose(self, instance_id: str) -> None:
        # Sends in flight get a sixth of the TTL: the lease may be lost because it
        # could not be renewed, and its key then outlives this call by a third only.
        await self._runtime.stop_delivery(instance_id, grace=self._leases.ttl / 6)
        self._metrics.partition_leases.remove(consumer_name(instance_id))
