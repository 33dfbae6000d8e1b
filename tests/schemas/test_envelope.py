"""The envelope: versioned, validated, with clear one-line rejections."""

import json
from datetime import UTC, datetime

import pytest

import schemas
from schemas import AckReply, AuditRecord, ContractError, Envelope, Source, decode

SOURCE = Source(principal_kind="desktop", principal_id="pair-1", authority="desktop_paired")


def test_wrap_encode_decode_round_trip():
    record = AuditRecord(action="pairing.connected", actor_kind="desktop", actor_id="pair-1")
    env = Envelope.wrap(
        record,
        source=SOURCE,
        tenant="acme",
        workspace="local",
        correlation_id="c1",
        causation_id="m0",
        idempotency_key="k1",
    )
    wire = json.loads(env.encode())
    assert wire["type"] == "audit.record" and wire["schemaVersion"] == 1
    assert wire["source"] == {
        "principalKind": "desktop",
        "principalId": "pair-1",
        "authority": "desktop_paired",
    }
    assert {
        "id",
        "time",
        "tenant",
        "workspace",
        "correlationId",
        "causationId",
        "idempotencyKey",
        "data",
    } <= set(wire)
    back = decode(env.encode(), AuditRecord)
    assert back.data == record and back.id == env.id and back.tenant == "acme"
    assert back.time.tzinfo is not None


def test_ids_are_unique_time_ordered_and_subject_safe():
    ids = [schemas.new_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 26 and i.isalnum() for i in ids)
    assert ids[0][:9] <= ids[-1][:9]


def test_ids_stay_unique_across_threads_and_forks():
    """The random bits are read ahead in chunks: two threads must never take the same
    bytes, and a forked child must not reuse the parent's (same ids in one millisecond)."""
    import os
    import threading

    schemas.new_id()  # the parent has read bytes ahead
    taken: list[list[str]] = [[] for _ in range(4)]
    threads = [
        threading.Thread(
            target=lambda mine=mine: mine.extend(schemas.new_id() for _ in range(3000))
        )
        for mine in taken
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ids = [i for mine in taken for i in mine]
    assert len(set(ids)) == len(ids) == 12000

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, then gone
        os.close(read)
        os.write(write, " ".join(schemas.new_id() for _ in range(100)).encode())
        os._exit(0)
    os.close(write)
    parent = {schemas.new_id()[10:] for _ in range(100)}
    with os.fdopen(read) as pipe:
        child = {i[10:] for i in pipe.read().split()}
    os.waitpid(pid, 0)
    assert len(child) == 100 and not parent & child


def _raw(**over):
    env = Envelope.wrap(AckReply(ok=True), source=SOURCE, tenant="acme")
    wire = json.loads(env.encode())
    wire.update(over)
    return json.dumps(wire).encode()


@pytest.mark.parametrize(
    "over, code, fragment",
    [
        ({"type": "audit.record"}, "contract.wrong_type", "expected"),
        ({"schemaVersion": 7}, "contract.unsupported_version", "newer"),
        ({"tenant": "a.b"}, "contract.invalid", "tenant"),
        ({"tenant": "system"}, "contract.invalid", "reserved"),
        ({"extra": 1}, "contract.invalid", "extra"),
        ({"data": {"ok": "maybe"}}, "contract.invalid", "data.ok"),
        (
            {"source": {"principalKind": "root", "principalId": "x"}},
            "contract.invalid",
            "principalKind",
        ),
    ],
)
def test_bad_envelopes_are_refused_with_a_reason(over, code, fragment):
    with pytest.raises(ContractError) as info:
        decode(_raw(**over), AckReply)
    assert info.value.code == code
    assert fragment in info.value.reason
    assert "\n" not in info.value.reason


@pytest.mark.parametrize("raw", [b"", b"not json", b"[]", b"{}", b"\xff\xfe", b'{"data": 1}'])
def test_garbage_is_refused_not_crashed(raw):
    with pytest.raises(ContractError):
        decode(raw, AckReply)


def test_command_result_never_invents_a_projection_fence():
    result = schemas.CommandResult(ok=True, status="completed")
    wire = json.loads(result.model_dump_json(by_alias=True))
    assert wire["projectionFence"] is None
    assert wire["reason"] == "desktop_pairing_projection_fence_unsupported"
    with pytest.raises(ValueError):
        schemas.CommandResult(ok=True, status="completed", projection_fence={"seq": 1})


def test_nkey_public_keys_are_checked():
    good = "U" + "A" * 55
    schemas.CredentialRefreshRequest(public_key=good)
    for bad in ["SU" + "A" * 56, "A" + "A" * 55, good + "A"]:
        with pytest.raises(ValueError):
            schemas.CredentialRefreshRequest(public_key=bad)


def test_every_catalog_type_is_wrappable():
    assert len(schemas.MESSAGES) >= 20
    for name, model in schemas.MESSAGES.items():
        assert model.message_type == name
        assert model.schema_version >= 1
    when = datetime(2026, 1, 1, tzinfo=UTC)
    env = Envelope.wrap(
        schemas.PresenceHeartbeat(
            principal_kind="desktop", principal_id="d", sequence=1, interval_seconds=5
        ),
        source=SOURCE,
        tenant="acme",
        time=when,
    )
    assert decode(env.encode(), schemas.PresenceHeartbeat).time == when


def test_creds_file_format_round_trips():
    text = schemas.render_creds("eyJhbGciOi.eyJzdWIi.c2ln", b"SUAEXAMPLESEED")
    assert text.startswith("-----BEGIN NATS USER JWT-----\neyJhbGciOi.eyJzdWIi.c2ln\n")
    assert schemas.parse_creds(text) == ("eyJhbGciOi.eyJzdWIi.c2ln", b"SUAEXAMPLESEED")
    with pytest.raises(ValueError):
        schemas.parse_creds("not creds")
