"""Say a repeating failure once, and once more when it ends.

A Gateway retries what fails (heartbeats, claims, syncs, outbox sends) every
second or so while Cloud is away; logging each attempt buried everything else.
`Repeats.failed(key, ...)` logs the first failure of `key` at info and the
repeats at debug; `Repeats.ok(key)` logs the recovery, with how many failed.
"""

from __future__ import annotations

import logging
from typing import Any


class Repeats:
    def __init__(self, log: logging.Logger) -> None:
        self._log = log
        self._failing: dict[str, int] = {}

    def failed(self, key: str, message: str, *args: Any) -> None:
        count = self._failing.get(key, 0) + 1
        self._failing[key] = count
        level = logging.INFO if count == 1 else logging.DEBUG
        self._log.log(
            level,
            message + ("" if count == 1 else " (again, %d times)"),
            *args,
            *(() if count == 1 else (count,)),
        )

    def ok(self, key: str) -> None:
        count = self._failing.pop(key, 0)
        if count:
            self._log.info("%s: working again after %d failed attempts", key, count)
