"""How long to wait for each attempt of a request the hub answers in milliseconds.

A request that reached a hub replica which then died is never answered, and
nothing tells the edge: a single long timeout makes every such request wait it
out in full (the failure Happy's relay postmortem lists first). Short first
attempts that grow find a live replica within about a second, while a hub that
is merely slow still gets the full timeout on later attempts. Only for requests
that are safe to repeat (the hub dedupes them)."""

from __future__ import annotations

from collections.abc import Iterator

FIRST_ATTEMPT_SECONDS = 1.0


def attempt_timeouts(longest: float, first: float = FIRST_ATTEMPT_SECONDS) -> Iterator[float]:
    """first, 2*first, 4*first, ... capped at `longest`, without end."""
    timeout = min(first, longest)
    while True:
        yield timeout
        timeout = min(timeout * 2, longest)
