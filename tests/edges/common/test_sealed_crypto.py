"""The cryptography of sealed pairings, without servers: what a web or phone client
must reproduce byte for byte, and what must fail."""

from __future__ import annotations

import json

import pytest

from edges.common import (
    ContentKey,
    ControllerKeys,
    DesktopSealingKey,
    InviteLink,
    normalise_fingerprint,
)
from edges.common._sealed import b64, unb64
from schemas import CommandKind, SealError, claims_bytes, content_aad, invite_aad, payload_hash


def _signed(keys: ControllerKeys, desktop: DesktopSealingKey, **over):
    fields = dict(
        tenant="acme",
        pairing_id="pair1",
        command_id="cmd1",
        sequence=7,
        kind="prompt",
        workspace_id="local",
        session_id="ses1",
        payload={"text": "hello"},
        desktop_key=desktop.public,
        issued_at=1_700_000_000,
    )
    return keys.sign(**{**fields, **over})


def test_the_signed_bytes_are_canonical_json_of_every_claim():
    keys, desktop = ControllerKeys.generate("phone"), DesktopSealingKey.generate()
    signed = _signed(keys, desktop, session_id=None)
    raw = claims_bytes(signed.claims)
    assert raw.startswith(b"cowork.command.v1\n")
    body = json.loads(raw.split(b"\n", 1)[1])
    assert list(body) == sorted(body) and b" " not in raw
    assert body["sessionId"] is None and body["controllerSequence"] == 7
    assert body["expiresAt"] == 1_700_000_300
    assert body["payloadHash"] == payload_hash(signed.sealed_payload)
    assert keys.public.verify(signed)
    # Off the wire (where a null sessionId is left out) it verifies the same.
    again = type(signed).model_validate_json(
        signed.model_dump_json(by_alias=True, exclude_none=True)
    )
    assert keys.public.verify(again)


def test_any_changed_claim_or_another_key_fails_verification():
    keys, desktop = ControllerKeys.generate("phone"), DesktopSealingKey.generate()
    signed = _signed(keys, desktop)
    for change in ({"command_id": "cmd2"}, {"controller_sequence": 8}, {"kind": CommandKind.ABORT}):
        forged = signed.model_copy(update={"claims": signed.claims.model_copy(update=change)})
        assert not keys.public.verify(forged), change
    assert not ControllerKeys.generate("other").public.verify(signed)


def test_the_payload_opens_only_for_the_desktop_and_only_for_its_command():
    keys, desktop = ControllerKeys.generate("phone"), DesktopSealingKey.generate()
    signed = _signed(keys, desktop)
    assert desktop.open_payload(signed) == {"text": "hello"}
    with pytest.raises(SealError):
        DesktopSealingKey.generate().open_payload(signed)
    moved = signed.model_copy(
        update={"claims": signed.claims.model_copy(update={"command_id": "cmd2"})}
    )
    with pytest.raises(SealError):  # bound to its command id (associated data)
        desktop.open_payload(moved)


def test_content_opens_for_its_recipients_where_it_belongs_only():
    kept, removed = ControllerKeys.generate("a"), ControllerKeys.generate("b")
    both = ContentKey(
        {
            kept.controller_id: kept.public.encryption_key,
            removed.controller_id: removed.public.encryption_key,
        }
    )
    aad = content_aad("acme", "pair1", "event", "ev1")
    sealed = both.seal(b"secret", aad)
    assert kept.open(sealed, aad) == removed.open(sealed, aad) == b"secret"
    with pytest.raises(SealError):  # moved to another event by the hub
        kept.open(sealed, content_aad("acme", "pair1", "event", "ev2"))
    later = ContentKey({kept.controller_id: kept.public.encryption_key}).seal(b"after", aad)
    assert kept.open(later, aad) == b"after"
    with pytest.raises(SealError, match="no content key"):
        removed.open(later, aad)
    tampered = sealed.model_copy(update={"ciphertext": sealed.ciphertext[:-2] + "AA"})
    with pytest.raises(SealError):
        ControllerKeys.from_json(kept.to_json()).open(tampered, aad)
    assert len(unb64(sealed.nonce)) == 12


def test_fingerprints_are_typed_loosely_and_keys_survive_a_round_trip():
    keys = ControllerKeys.generate("phone")
    fp = keys.public.fingerprint
    assert len(fp) == 19 and normalise_fingerprint(fp.lower().replace("-", " ")) == fp
    assert ControllerKeys.from_json(keys.to_json()).controller_id == keys.controller_id
    with pytest.raises(SealError):
        ControllerKeys.from_json({"label": "x", "signingSeed": "AA"})


def test_an_invite_link_round_trips_and_its_secret_opens_only_for_its_controller():
    desktop = DesktopSealingKey.generate()
    link = InviteLink("acme", "pair1", "inv1", b64(b"s" * 32), desktop.public, "https://hub:8080")
    text = link.to_text()
    assert text.startswith("cowork+enrol://") and InviteLink.parse(text) == link
    assert link.desktop_fingerprint == desktop.fingerprint
    for bad in ("https://x", text.replace("secret=", "secrets="), text.replace("v=1", "v=2")):
        with pytest.raises(SealError):
            InviteLink.parse(bad)

    honest = ControllerKeys.generate("phone").public
    presented = link.present(honest)

    def aad(label: str, signing: str, encryption: str, pairing: str = "pair1") -> bytes:
        return invite_aad("acme", pairing, "inv1", label, signing, encryption)

    keys = (honest.signing_key, honest.encryption_key)
    assert desktop.open_invite(presented, aad(honest.label, *keys)) == b"s" * 32
    hub = ControllerKeys.generate("hub").public
    for wrong in (
        aad("renamed", *keys),
        aad(honest.label, hub.signing_key, honest.encryption_key),
        aad(honest.label, honest.signing_key, hub.encryption_key),
        aad(honest.label, *keys, pairing="pair2"),
    ):
        with pytest.raises(SealError):
            desktop.open_invite(presented, wrong)
    with pytest.raises(SealError):  # only the Desktop's key opens it
        DesktopSealingKey.generate().open_invite(presented, aad(honest.label, *keys))
