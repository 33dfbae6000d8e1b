-- Fencing tokens for partition leases (hub/core/_leases.py). A lease's token is
-- the NATS KV revision at which its holder took it: later holders always have a
-- larger one. A new holder raises the partition's token here before it starts
-- (waiting for the old holder's write in flight, which holds the row FOR SHARE),
-- and every write of a holder checks its own token in the same transaction: a
-- holder that lost its lease without knowing (frozen, cut off, too slow) has its
-- late write refused instead of landing behind the new holder's, out of order.
CREATE TABLE partition_fences (
    consumer text PRIMARY KEY,
    token bigint NOT NULL
);
