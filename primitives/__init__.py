"""What the hub and the channel runtime share of NATS itself, with no knowledge of
either (no contract, no domain, no database): the KV lease (`KvLease`).

The hub's partition leases (hub/core/_leases.py) and the channel transports'
single-connection lease (channels/runtime/_transport_state.py) are both built on
it, so there is one lease rule in the project. It imports nothing of ours.
"""

from __future__ import annotations

from ._kv_lease import KvLease, LeaseLost, direct_kv

__all__ = ["KvLease", "LeaseLost", "direct_kv"]
