"""The hosted channel runtime: ingress (verify, limit, durable publish),
ordered delivery with retries and a breaker, and the sent-ledger.
"""

from __future__ import annotations

from ._runtime import ChannelRuntime, RuntimeOptions

__all__ = ["ChannelRuntime", "RuntimeOptions"]
