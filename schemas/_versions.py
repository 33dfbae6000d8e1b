"""The contract versions this code speaks, sent by every Gateway heartbeat.

Versions are `MAJOR.MINOR`. A peer is compatible when the majors match and its
minor is not older than the minimum the hub declares (`hub/_gateway_versions`);
a major bump is a breaking change of that contract.
"""

from __future__ import annotations

from functools import cache
from importlib import metadata

BUS_PROTOCOL = "1.0"  # subjects, envelope, request/reply shapes
EVENT_CONTRACT = "1.0"  # the event bodies of Cloud-owned work (work.output kind=event)
PROJECTION_CONTRACT = "1.0"  # workspace projection rows and their sequences
CHECKPOINT_SCHEMA = "1.0"  # checkpoint metadata of Cloud-owned work


@cache  # read from the installed metadata once: the hub checks it on every Gateway heartbeat
def product_version() -> str:
    try:
        return metadata.version("cowork-hub")
    except metadata.PackageNotFoundError:  # running from a source tree
        return "0.0.0"


__all__ = [
    "BUS_PROTOCOL",
    "EVENT_CONTRACT",
    "PROJECTION_CONTRACT",
    "CHECKPOINT_SCHEMA",
    "product_version",
]
