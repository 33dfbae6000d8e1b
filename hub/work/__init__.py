"""Cloud-owned edge work: enqueue, pushed claims under leases, fenced outputs,
the lease reaper, and their HTTP routes.
"""

from __future__ import annotations

from ._common import EdgeWorkError
from ._service import EdgeWorkService, EnqueueWork
from ._routes import add_routes

__all__ = ['EdgeWorkError', 'EdgeWorkService', 'EnqueueWork', 'add_routes']
