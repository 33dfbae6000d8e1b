"""Fixtures the Desktop test modules share (a module defining its own wins)."""

from __future__ import annotations

import pytest
from desktopkit import pair_and_start


@pytest.fixture
async def desktop(hub, http, opencode, operator_nats_url, tmp_path):
    """A paired, running Desktop that may answer approvals and questions remotely."""
    running = await pair_and_start(
        http,
        operator_nats_url,
        tmp_path / "desktop",
        opencode.url,
        policy={"remoteApprovals": "remote_allowed", "remoteQuestions": "remote_allowed"},
    )
    yield running
    if not running.task.done():
        await running.stop()
