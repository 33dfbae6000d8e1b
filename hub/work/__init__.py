"""Cloud-owned edge work: enqueue, pushed claims under leases, fenced outputs,
the lease reaper, and their HTTP routes.
"""

from __future__ import annotations

from ._common import EdgeWorkError
from ._routes import add_routes
from ._service import EdgeWorkService, EnqueueWork

__all__ = ["EdgeWorkError", "EdgeWorkService", "EnqueueWork", "add_routes"]
