"""Prometheus metrics, one registry per hub instance (tests run several in one process)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Label children cached per metric: `labels()` validates and locks on every call,
# which was a visible share of a webhook request's CPU. The cache only holds label
# sets the metric holds anyway; past this many it stops growing (labels() still works).
_CHILD_CACHE_LIMIT = 4096


class HubMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter(
            "cowork_http_requests_total",
            "HTTP requests served",
            ["method", "route", "status"],
            registry=r,
        )
        self.http_latency = Histogram(
            "cowork_http_request_duration_seconds",
            "HTTP request latency",
            ["route"],
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )
        self.bus_messages = Counter(
            "cowork_bus_messages_total",
            "Bus messages handled by the hub",
            ["family", "outcome"],
            registry=r,
        )
        self.dead_letters = Counter(
            "cowork_dead_letters_total",
            "Messages set aside with a reason",
            ["family", "code"],
            registry=r,
        )
        self.nats_connected = Gauge(
            "cowork_nats_connected", "1 while the hub is connected to NATS", registry=r
        )
        self.nats_reconnects = Counter(
            "cowork_nats_reconnects_total", "NATS reconnections", registry=r
        )
        self.ready = Gauge("cowork_ready", "1 while /readyz answers 200", registry=r)
        self.slow_consumer_drops = Counter(
            "cowork_nats_slow_consumer_drops_total",
            "Messages the hub's NATS client dropped because a subscription fell behind, "
            "by subject family",
            ["family"],
            registry=r,
        )
        self.presence_late = Counter(
            "cowork_presence_heartbeats_late_total",
            "Heartbeats dropped because the hub would have written them more than two of "
            "their intervals after they were sent or arrived (they prove nothing any "
            "more), by sender kind (desktop, gateway)",
            ["principal"],
            registry=r,
        )
        self.presence_sweep_paused = Counter(
            "cowork_presence_sweep_paused_total",
            "Outages of this replica's NATS connection, and stalls of its event loop, "
            "during which the sweeps marking edges offline or unhealthy for missing "
            "heartbeats paused (until the fleet had settled for "
            "COWORK_PRESENCE_GRACE_SECONDS, or for as long as the stall after it)",
            registry=r,
        )
        self.loop_lag = Histogram(
            "cowork_event_loop_lag_seconds",
            "How late this replica's event loop ran a timer due every 0.25 s (a stall "
            "over 1 s pauses the presence sweeps and logs loop.stalled)",
            registry=r,
            buckets=(0.001, 0.005, 0.025, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.partition_leases = Gauge(
            "cowork_partition_lease_held",
            "1 while this replica holds the lease of a partition (its consumer's name) "
            "and works it",
            ["consumer"],
            registry=r,
        )
        self.lanes_open = Gauge(
            "cowork_consumer_lanes_open",
            "Keys (Desktops) over their rate whose messages wait in a lane of their own "
            "instead of the consumer's shared line",
            ["consumer"],
            registry=r,
        )
        self.lane_messages = Counter(
            "cowork_consumer_lane_messages_total",
            "Messages the shared line passed to a lane",
            ["consumer"],
            registry=r,
        )
        self.db_pool_size = Gauge(
            "cowork_db_pool_connections", "PostgreSQL pool connections", ["state"], registry=r
        )
        self.channel_instances = Gauge(
            "cowork_channel_instances",
            "Channel instances on this hub by runtime state (disabled ones as 'disabled')",
            ["state"],
            registry=r,
        )
        # Per channel instance. Labels are instance ids the hub knows (anything else
        # is counted as "unknown") and fixed outcome words: never chat or user ids.
        self.channel_webhook_requests = Counter(
            "cowork_channel_webhook_requests_total",
            "Webhook requests by channel instance and outcome (accepted, rejected_4xx, failed_5xx)",
            ["instance", "outcome"],
            registry=r,
        )
        self.channel_inbound = Counter(
            "cowork_channel_inbound_total",
            "Inbound chat messages handled by the router "
            "(accepted, refused, duplicate, dead_lettered)",
            ["instance", "outcome"],
            registry=r,
        )
        self.channel_deliveries = Counter(
            "cowork_channel_deliveries_total",
            "Delivery outcomes reported by channel "
            "instances (sent, retrying, dead_lettered, duplicate)",
            ["instance", "status"],
            registry=r,
        )
        self.channel_instance_state = Gauge(
            "cowork_channel_instance_state",
            "1 for each channel instance's current runtime state ('disabled' when disabled)",
            ["instance", "state"],
            registry=r,
        )
        self._children: dict[tuple, Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = metric.labels(*labels)
            if len(self._children) < _CHILD_CACHE_LIMIT:
                self._children[key] = child
        return child

    def http_served(self, method: str, route: str, status: int, seconds: float) -> None:
        """One HTTP request answered: counted by method/route/status, timed by route."""
        self._child(self.http_requests, method, route, str(status)).inc()
        self._child(self.http_latency, route).observe(seconds)

    def webhook_answered(self, instance: str, status: int) -> None:
        """One webhook answer, counted by instance (a known id or "unknown") and outcome."""
        self._child(self.channel_webhook_requests, instance, webhook_outcome(status)).inc()


def webhook_outcome(status: int) -> str:
    """A webhook answer's status as a bounded label value."""
    if status < 400:
        return "accepted"
    return "rejected_4xx" if status < 500 else "failed_5xx"
