"""The `cowork` command: `cowork up` (embedded NATS + PostgreSQL + hub), `hub serve`,
`keys`, `schema export`, and the Desktop, Gateway and channel commands of the
edge packages. It composes every package; nothing imports it.
"""

from __future__ import annotations

from ._main import main

__all__ = ["main"]
