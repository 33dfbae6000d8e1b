"""Prometheus metrics, one registry per hub instance (tests run several in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class HubMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter(
            "cowork_http_requests_total", "HTTP requests served",
            ["method", "route", "status"], registry=r)
        self.http_latency = Histogram(
            "cowork_http_request_duration_seconds", "HTTP request latency",
            ["route"], registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
        self.bus_messages = Counter(
            "cowork_bus_messages_total", "Bus messages handled by the hub",
            ["family", "outcome"], registry=r)
        self.dead_letters = Counter(
            "cowork_dead_letters_total", "Messages set aside with a reason",
            ["family", "code"], registry=r)
        self.nats_connected = Gauge(
            "cowork_nats_connected", "1 while the hub is connected to NATS", registry=r)
        self.nats_reconnects = Counter(
            "cowork_nats_reconnects_total", "NATS reconnections", registry=r)
        self.ready = Gauge("cowork_ready", "1 while /readyz answers 200", registry=r)
        self.db_pool_size = Gauge(
            "cowork_db_pool_connections", "PostgreSQL pool connections", ["state"], registry=r)
