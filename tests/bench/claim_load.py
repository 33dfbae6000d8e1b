"""The claimers of tests/bench/test_bench_edge_work.py, run as their own process.

The claimers must not share the measured hub's event loop (nor its GIL), so the
benchmark starts this file with `python tests/bench/claim_load.py`, hands it a
JSON spec on stdin, reads one `ready` line once every claimer is connected, writes
`go` on stdin to start them all together, and reads one JSON result line.

Two modes (`mode` in the spec, camelCase JSON):

- `gateways`: one claimer per entry of `gateways` ({registrationId, jwt, seed}),
  each the product's own Gateway claim code (edges/gateway: `GatewayClaims._claim_one`
  and `renew`, `GatewayConnection._connect` and `request`, the same envelope,
  claim id, hedged `ask` and reply decoding) on its own NATS connection (`natsUrl`)
  with its own credential; only what would run the lease (a `WorkRunner` on
  OpenCode) is replaced by keeping the lease. Each claims in a loop, one claim in
  flight, until the hub answers `workId: null`. With `renewEvery` (seconds), each
  also renews all the leases it holds that often (16 renewals in flight at most),
  and keeps renewing for `renewTail` seconds after the last claim.
- `raw`: `claimers` plain asyncpg connections to `dsn`, each looping one transaction
  of `SELECT … FOR UPDATE SKIP LOCKED LIMIT 1` + `UPDATE` on `edge_work` until
  nothing is left, for `tenant`.

Result: claims, seconds (from `go` to the last claimer's end), latencies (seconds,
one per claim attempt, the final empty one included), perClaimer counts,
cpuSeconds of this process; `gateways` adds renewals, renewLatencies, refused
(codes of refused claims or renewals).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import sys
import time
from typing import Any

from edges.common import AnswerTimes, EdgeCredentials, ReconnectPolicy, Repeats
from edges.gateway._bus import GatewayConnection, Refused
from edges.gateway._claims import GatewayClaims
from edges.gateway._store import GatewayFile
from edges.gateway._work import LeaseLost, TransientBusError
from schemas import WorkClaimReply

log = logging.getLogger("bench.claims")


class _Journal:
    """The Gateway store's two calls a refused renewal makes: remembered, not written."""

    def __init__(self) -> None:
        self.refused: list[str] = []

    def journal_update(self, lease_token: str, **fields: Any) -> None:
        pass

    def audit(self, action: str, **fields: Any) -> None:
        self.refused.append(str(fields.get("code", action)))


class BenchGateway(GatewayConnection, GatewayClaims):
    """A Gateway agent's connection and claim parts, without OpenCode: a lease it
    claims is kept (for renewals), not run."""

    def __init__(self, nats_url: str, tenant: str, reg_id: str, jwt: str, seed: str) -> None:
        self.gateway = GatewayFile(
            tenant=tenant,
            registration_id=reg_id,
            display_name=reg_id,
            kind="edge_worker",
            scopes=[],
            sync_scopes=[],
            hub_urls=[nats_url],
            registered_at="",
        )
        self.creds = EdgeCredentials(jwt, seed.encode())
        self.reconnect = ReconnectPolicy()
        self.fatal = None
        self._unsent = 0
        self.store = _Journal()  # type: ignore[assignment]
        self.nats_urls = [nats_url]
        self.nc = None
        self.state = "active"
        self.max_concurrent_work = 1 << 30
        self.runners = {}
        self.connected = asyncio.Event()
        self._tasks = {}
        self._stopped = asyncio.Event()
        self._stopping = False
        self._claim_wanted = asyncio.Event()
        self._offered = []
        self._claim = None
        self._answer_times = AnswerTimes()
        self._envelopes = {}
        self._gone = set()
        self._auth_failures = 0
        self._repeats = Repeats(log)
        self._health = "healthy"
        self.leases: dict[str, str] = {}  # work id -> lease token

    def _start(self, claim: WorkClaimReply) -> None:
        assert claim.work_id is not None and claim.lease_token is not None
        self.leases[claim.work_id] = claim.lease_token

    def _fail(self, message: str) -> None:
        raise RuntimeError(message)


async def gateways(spec: dict) -> dict:
    agents = [
        BenchGateway(spec["natsUrl"], spec["tenant"], g["registrationId"], g["jwt"], g["seed"])
        for g in spec["gateways"]
    ]
    for agent in agents:
        agent.nc = await agent._connect()
    renew_every = spec.get("renewEvery")
    latencies: list[float] = []
    renew_latencies: list[float] = []
    refused: list[str] = []
    slots = asyncio.Semaphore(16)

    async def renew_one(agent: BenchGateway, work_id: str, token: str) -> None:
        async with slots:
            t0 = time.perf_counter()
            try:
                await agent.renew(work_id, token)
            except LeaseLost as exc:
                refused.append(f"renew {exc}")
                return
            except TransientBusError as exc:
                refused.append(f"renew transient {exc}")
                return
            renew_latencies.append(time.perf_counter() - t0)

    async def renewer(agent: BenchGateway) -> None:
        while True:
            started = time.monotonic()
            await asyncio.gather(*(renew_one(agent, w, t) for w, t in list(agent.leases.items())))
            await asyncio.sleep(max(0.0, renew_every - (time.monotonic() - started)))

    async def claimer(agent: BenchGateway) -> int:
        while True:
            t0 = time.perf_counter()
            try:
                more = await agent._claim_one()
            except (Refused, TransientBusError) as exc:
                refused.append(f"claim {exc}")
                return len(agent.leases)
            latencies.append(time.perf_counter() - t0)
            if not more:
                return len(agent.leases)

    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    cpu, started = time.process_time(), time.perf_counter()
    renewers = [asyncio.create_task(renewer(a)) for a in agents] if renew_every else []
    counts = await asyncio.gather(*(claimer(a) for a in agents))
    seconds = time.perf_counter() - started
    if renewers:
        await asyncio.sleep(float(spec.get("renewTail", 0)))  # a full round of all leases
        for task in renewers:
            task.cancel()
        await asyncio.gather(*renewers, return_exceptions=True)
    cpu_seconds = time.process_time() - cpu
    for agent in agents:
        agent._stopping = True  # (a closed connection is not to be dialled again)
        refused.extend(agent.store.refused)  # type: ignore[attr-defined]
        if agent.nc is not None:
            await agent.nc.close()
    return {
        "claims": sum(counts),
        "seconds": seconds,
        "latencies": latencies,
        "perClaimer": counts,
        "renewals": len(renew_latencies),
        "renewLatencies": renew_latencies,
        "refused": refused,
        "cpuSeconds": cpu_seconds,
    }


_RAW_PICK = """
    SELECT work_id FROM edge_work WHERE tenant = $1 AND state = 'queued' AND kind = 'prompt'
    ORDER BY created_at, work_id LIMIT 1 FOR UPDATE SKIP LOCKED"""
# A lease that outlives the run, so the hub's reaper leaves these rows alone.
_RAW_LEASE = """
    UPDATE edge_work SET state = 'leased', owner = $3, lease_token = $4,
        lease_expires_at = now() + interval '1 hour', attempts = attempts + 1, updated_at = now()
    WHERE tenant = $1 AND work_id = $2"""


async def raw(spec: dict) -> dict:
    import asyncpg

    tenant = spec["tenant"]
    conns = [await asyncpg.connect(spec["dsn"]) for _ in range(int(spec["claimers"]))]
    latencies: list[float] = []

    async def loop(conn: asyncpg.Connection, owner: str) -> int:
        got = 0
        while True:
            t0 = time.perf_counter()
            async with conn.transaction():
                work_id = await conn.fetchval(_RAW_PICK, tenant)
                if work_id is not None:
                    await conn.execute(
                        _RAW_LEASE, tenant, work_id, owner, secrets.token_urlsafe(24)
                    )
            latencies.append(time.perf_counter() - t0)
            if work_id is None:
                return got
            got += 1

    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    cpu, started = time.process_time(), time.perf_counter()
    counts = await asyncio.gather(*(loop(c, f"raw{i}") for i, c in enumerate(conns)))
    seconds = time.perf_counter() - started
    cpu_seconds = time.process_time() - cpu
    for conn in conns:
        await conn.close()
    return {
        "claims": sum(counts),
        "seconds": seconds,
        "latencies": latencies,
        "perClaimer": counts,
        "cpuSeconds": cpu_seconds,
    }


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    spec = json.loads(sys.stdin.readline())
    mode = {"gateways": gateways, "raw": raw}[spec["mode"]]
    print(json.dumps(asyncio.run(mode(spec))), flush=True)


if __name__ == "__main__":
    main()
