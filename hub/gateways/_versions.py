"""The declared version-compatibility policy for Gateways.

Every Gateway reports six versions (schemas.VersionSet). The hub accepts it when:

- the bus protocol, event contract, projection contract and checkpoint schema
  have the same MAJOR as this hub's (`schemas.versions`) and a MINOR not older
  than the minimum below (a major bump is a breaking change of that contract);
- the product has the same MAJOR as this hub (a Gateway of another product line
  speaks an unknown dialect);
- OpenCode is at least `MIN_OPENCODE` (older releases lack the server API that
  `edges.common._opencode` relies on).

A version that is absent, empty or "unknown" is *missing*: the registration is
paused until a heartbeat reports it. A version that is present but fails a rule
is *incompatible*: registering is refused, and a heartbeat pauses the
registration. Either way the answer lists every problem, not just the first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from schemas import VersionSet, versions

MIN_OPENCODE = (1, 0, 0)
# (field, the hub's version, the oldest accepted MAJOR.MINOR)
CONTRACTS: tuple[tuple[str, str, tuple[int, int]], ...] = (
    ("bus_protocol", versions.BUS_PROTOCOL, (1, 0)),
    ("event_contract", versions.EVENT_CONTRACT, (1, 0)),
    ("projection_contract", versions.PROJECTION_CONTRACT, (1, 0)),
    ("checkpoint_schema", versions.CHECKPOINT_SCHEMA, (1, 0)),
)
FIELDS = ("product", "opencode", *(name for name, _, _ in CONTRACTS))
_MISSING = {"", "unknown", "none", "null"}
_VERSION = re.compile(r"v?(\d{1,6})(?:\.(\d{1,6}))?(?:\.(\d{1,6}))?(?:[-+.].*)?")


@dataclass(frozen=True)
class VersionVerdict:
    missing: tuple[str, ...]
    incompatible: tuple[str, ...]  # one readable line per problem

    @property
    def ok(self) -> bool:
        return not self.missing and not self.incompatible

    def reason(self) -> str | None:
        parts = []
        if self.incompatible:
            parts.append("incompatible versions: " + "; ".join(self.incompatible))
        if self.missing:
            parts.append("missing versions: " + ", ".join(_camel(f) for f in self.missing))
        return "; ".join(parts) or None


def parse(text: str) -> tuple[int, int, int] | None:
    match = _VERSION.fullmatch(text.strip())
    if match is None:
        return None
    major, minor, patch = (int(part or 0) for part in match.groups())
    return major, minor, patch


def check(reported: VersionSet | None, product: str | None = None) -> VersionVerdict:
    """Judge the versions a Gateway reported against this hub's policy."""
    if reported is None:
        return VersionVerdict(missing=FIELDS, incompatible=())
    values = reported.model_dump()
    missing = tuple(f for f in FIELDS if str(values.get(f) or "").strip().lower() in _MISSING)
    problems: list[str] = []
    ours = parse(product or versions.product_version()) or (0, 0, 0)
    for name, theirs in values.items():
        if name in missing:
            continue
        problem = _judge(name, str(theirs), ours)
        if problem:
            problems.append(problem)
    return VersionVerdict(missing=missing, incompatible=tuple(problems))


def _judge(name: str, text: str, product: tuple[int, int, int]) -> str | None:
    label = _camel(name)
    got = parse(text)
    if got is None:
        return f"{label} {text!r} is not a version"
    if name == "product":
        if got[0] != product[0]:
            return f"{label} {text} has major {got[0]}, this hub needs major {product[0]}"
        return None
    if name == "opencode":
        if got < MIN_OPENCODE:
            return f"{label} {text} is older than {'.'.join(map(str, MIN_OPENCODE))}"
        return None
    for contract, hub_version, minimum in CONTRACTS:
        if contract == name:
            ours = parse(hub_version)
            if ours is None:  # CONTRACTS holds this hub's own versions
                raise ValueError(f"contract {contract} version {hub_version!r} is not a version")
            major = ours[0]
            if got[0] != major:
                return f"{label} {text} has major {got[0]}, this hub speaks {hub_version}"
            if got[:2] < minimum:
                return f"{label} {text} is older than {minimum[0]}.{minimum[1]}"
    return None


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)
