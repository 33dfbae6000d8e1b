"""A flush whose PONG proves the server has processed everything sent before it.

nats-py's `flush()` writes its PING straight to the socket, ahead of the
commands still in the client's pending buffer (a SUB or PUB issued just
before), which its flusher task writes a moment later. So the PONG can come
back before the server has seen them: a subscriber that flushed may still have
no interest registered when another connection publishes, or an answer that
was "flushed" may still be unread when the hub acts on another connection
(seen as a lost message under load, with the server's trace showing the SUB
arriving after the PING). The first flush hands the pending commands to the
socket (its flusher runs before any PONG can be read); the second PING
follows them on the wire, and the server answers it only after processing them.
"""

from __future__ import annotations

from nats.aio.client import Client


async def flushed(nc: Client, timeout: int = 10) -> None:
    """Return once the server has processed every command `nc` sent before the call
    (each of the two round trips is bounded by `timeout` seconds)."""
    await nc.flush(timeout=timeout)
    await nc.flush(timeout=timeout)
