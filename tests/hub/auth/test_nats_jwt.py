"""Operator-mode auth against a real nats-server: hub/auth/_jwt.py and hub/auth/_keys.py.

Every claim about the server's behaviour (who may connect, publish, subscribe,
when a connection is dropped) is checked on a real nats-server started from
the project's own NatsServer, with the config block BusKeys.server_config().
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from cryptography.fernet import Fernet

from edges.local import NatsServer, free_port
from hub.auth import _jwt
from hub.auth._keys import BusKeys, KeyStoreError
from hub.core import flushed

WAIT = 5.0  # upper bound for any single wait in this file


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


in_memory_auth = _jwt.nats_auth_options


class Watch:
    """Collects a client's async errors and tells when it was closed."""

    def __init__(self) -> None:
        self.errors: list[Exception] = []
        self.closed = asyncio.Event()
        self.closed_at: float | None = None

    async def error_cb(self, exc: Exception) -> None:
        self.errors.append(exc)

    async def closed_cb(self) -> None:
        self.closed_at = time.monotonic()
        self.closed.set()

    async def wait_error(self, text: str) -> Exception:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            for exc in self.errors:
                if text in str(exc).lower():
                    return exc
            await asyncio.sleep(0.02)
        raise AssertionError(f"no error containing {text!r}; got {self.errors!r}")


async def connect(url: str, *, watch: Watch | None = None, **auth) -> nats.NATS:
    """One attempt, no reconnects: a refusal surfaces as the connect error."""
    watch = watch or Watch()
    return await nats.connect(
        url,
        allow_reconnect=False,
        max_reconnect_attempts=0,
        connect_timeout=2,
        error_cb=watch.error_cb,
        closed_cb=watch.closed_cb,
        **auth,
    )


async def assert_refused(url: str, **auth) -> None:
    with pytest.raises(Exception) as info:
        nc = await connect(url, **auth)
        await nc.close()
    assert "authorization violation" in str(info.value).lower(), repr(info.value)


def new_user(
    keys: BusKeys, *, pub_allow=(">",), sub_allow=(">",), ttl_seconds=None, **extra
) -> tuple[bytes, str]:
    seed = _jwt.new_seed("user")
    token, _ = keys.mint_user(
        _jwt.public_key(seed),
        name="test-user",
        pub_allow=pub_allow,
        sub_allow=sub_allow,
        ttl_seconds=ttl_seconds,
        **extra,
    )
    return seed, token


def write_creds(path: Path, token: str, seed: bytes) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "w") as out:
        out.write(_jwt.creds_file(token, seed))
    return path


async def push_account(keys: BusKeys, url: str, revocations: dict[str, int]) -> dict:
    """What the hub does: its SYS user pushes the re-signed COWORK JWT."""
    seed = _jwt.new_seed("user")
    system_jwt = keys.mint_system_user(_jwt.public_key(seed), name="test-hub-system")
    sys_nc = await connect(url, **in_memory_auth(system_jwt, seed))
    try:
        reply = await sys_nc.request(
            "$SYS.REQ.CLAIMS.UPDATE", keys.app_account_jwt(revocations).encode(), timeout=WAIT
        )
    finally:
        await sys_nc.close()
    outcome = json.loads(reply.data)
    assert "error" not in outcome, outcome
    assert outcome["data"]["code"] == 200, outcome
    return outcome


async def nothing_arrives(sub, seconds: float = 0.3) -> None:
    with pytest.raises(nats.errors.TimeoutError):
        msg = await sub.next_msg(timeout=seconds)
        pytest.fail(f"unexpected delivery on {msg.subject}")


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> BusKeys:
    return BusKeys.load_or_create(tmp_path_factory.mktemp("jwt-keys") / "keys")


async def start_server(store: Path, keys: BusKeys, port: int | None = None) -> NatsServer:
    server = NatsServer(
        store_dir=store,
        port=port or free_port(),
        extra_config=keys.server_config(store / "resolver"),
    )
    await server.start()
    return server


@pytest.fixture(scope="module")
async def url(tmp_path_factory: pytest.TempPathFactory, keys: BusKeys) -> AsyncIterator[str]:
    server = await start_server(tmp_path_factory.mktemp("jwt-nats"), keys)
    try:
        yield server.url
    finally:
        await server.stop()


# --------------------------------------------------------------------------
# _jwt: format and verification (no server)
# --------------------------------------------------------------------------


def test_encode_follows_the_nats_format():
    seed = _jwt.new_seed("account")
    token = _jwt.encode({"sub": "x", "name": "n", "iat": 1_700_000_000}, seed)
    header, payload, _ = token.split(".")
    assert "=" not in token
    assert json.loads(base64.urlsafe_b64decode(header + "==")) == {
        "typ": "JWT",
        "alg": "ed25519-nkey",
    }
    claims = _jwt.decode(token)
    assert claims["iss"] == _jwt.public_key(seed) and claims["iat"] == 1_700_000_000
    import hashlib

    without_jti = {k: v for k, v in claims.items() if k != "jti"}
    digest = hashlib.new("sha512_256", json.dumps(without_jti, separators=(",", ":")).encode())
    assert claims["jti"] == base64.b32encode(digest.digest()).decode().rstrip("=")
    # Ed25519 is deterministic: same claims, same token (server_config relies on it).
    assert _jwt.encode({"sub": "x", "name": "n", "iat": 1_700_000_000}, seed) == token


def test_seeds_and_public_keys_have_their_kind():
    for kind, prefix in (("operator", "O"), ("account", "A"), ("user", "U")):
        seed = _jwt.new_seed(kind)
        assert seed.startswith(b"S" + prefix.encode())
        assert _jwt.public_key(seed).startswith(prefix)
        assert _jwt.check_public_key(_jwt.public_key(seed), kind)
    user = _jwt.public_key(_jwt.new_seed("user"))
    with pytest.raises(_jwt.JwtError):
        _jwt.check_public_key(user, "account")
    with pytest.raises(_jwt.JwtError):
        _jwt.check_public_key(user[:-1] + ("A" if user[-1] != "A" else "B"), "user")


def test_decode_rejects_bad_tokens():
    seed = _jwt.new_seed("account")
    token = _jwt.encode({"sub": "x", "name": "n"}, seed)
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    forged = (
        base64.urlsafe_b64encode(json.dumps({**claims, "name": "admin"}).encode())
        .rstrip(b"=")
        .decode()
    )
    other = _jwt.encode({"sub": "x", "name": "n"}, _jwt.new_seed("account")).split(".")[2]
    expired = _jwt.encode({"sub": "x", "name": "n", "exp": int(time.time()) - 5}, seed)
    bad = {
        "malformed": "not-a-jwt",
        "garbage part": f"{header}.!!!.{signature}",
        "tampered": f"{header}.{forged}.{signature}",
        "foreign signature": f"{header}.{payload}.{other}",
        "expired": expired,
    }
    for why, candidate in bad.items():
        with pytest.raises(_jwt.JwtError):
            _jwt.decode(candidate)
            pytest.fail(why)
    with pytest.raises(_jwt.JwtError, match="not trusted"):
        _jwt.decode(token, trusted_issuers={_jwt.public_key(_jwt.new_seed("account"))})
    assert _jwt.decode(token, trusted_issuers={_jwt.public_key(seed)})["name"] == "n"
    assert _jwt.decode(expired, verify=False)["name"] == "n"


def test_minted_user_claims(keys: BusKeys):
    seed = _jwt.new_seed("user")
    token, exp = keys.mint_user(
        _jwt.public_key(seed),
        name="u",
        pub_allow=["a.>"],
        sub_allow=["b.>"],
        sub_deny=["b.secret"],
        allow_responses={"max": 2, "ttl": 1.5},
        ttl_seconds=60,
    )
    claims = _jwt.decode(token, trusted_issuers=set(keys.app_signing_keys))
    assert claims["sub"] == _jwt.public_key(seed) and claims["exp"] == exp
    assert abs(exp - time.time() - 60) <= 2
    nats_claims = claims["nats"]
    assert nats_claims["issuer_account"] == keys.app_account_public
    assert nats_claims["pub"] == {"allow": ["a.>"]}
    assert nats_claims["sub"] == {"allow": ["b.>"], "deny": ["b.secret"]}
    assert nats_claims["resp"] == {"max": 2, "ttl": 1_500_000_000}
    # To NATS an empty allow list means "everything"; to us it means nothing.
    token, _ = keys.mint_user(
        _jwt.public_key(seed), name="u", pub_allow=[], sub_allow=[], ttl_seconds=None
    )
    assert _jwt.decode(token)["nats"]["pub"] == _jwt.decode(token)["nats"]["sub"] == {"deny": [">"]}
    with pytest.raises(ValueError):
        keys.mint_user(
            keys.app_account_public, name="u", pub_allow=[], sub_allow=[], ttl_seconds=None
        )


# --------------------------------------------------------------------------
# Connecting
# --------------------------------------------------------------------------


async def test_user_connects_with_a_creds_file(url: str, keys: BusKeys, tmp_path: Path):
    seed, token = new_user(keys, pub_allow=["t.creds.>"], sub_allow=["t.creds.>"])
    creds = write_creds(tmp_path / "user.creds", token, seed)
    nc = await connect(url, user_credentials=str(creds))
    try:
        sub = await nc.subscribe("t.creds.>")
        await nc.publish("t.creds.1", b"hello")
        assert (await sub.next_msg(timeout=WAIT)).data == b"hello"
    finally:
        await nc.close()


async def test_user_connects_in_memory_and_replies(url: str, keys: BusKeys):
    seed, token = new_user(keys, pub_allow=["t.mem.>"], sub_allow=["t.mem.>", "_INBOX.>"])
    server_seed, server_token = new_user(
        keys, pub_allow=[], sub_allow=["t.mem.svc"], allow_responses=True
    )
    client = await connect(url, **in_memory_auth(token, seed))
    service = await connect(url, **in_memory_auth(server_token, server_seed))
    try:

        async def echo(msg):
            await msg.respond(b"re:" + msg.data)

        await service.subscribe("t.mem.svc", cb=echo)
        # Not flush(): nats-py writes its PING ahead of the pending SUB, so its PONG
        # does not prove the interest is registered (hub.core._flush).
        await flushed(service)
        reply = await client.request("t.mem.svc", b"ping", timeout=WAIT)
        assert reply.data == b"re:ping"  # allow_responses, though pub_allow is empty
        sub = await client.subscribe("t.mem.>")
        await flushed(client)
        await service.publish("t.mem.other", b"not allowed")
        await service.flush()
        await nothing_arrives(sub)
    finally:
        await client.close()
        await service.close()


async def test_jetstream_works_for_a_user_allowed_the_api(url: str, keys: BusKeys):
    seed, token = new_user(keys, pub_allow=["$JS.API.>", "t.js.>"], sub_allow=["_INBOX.>"])
    nc = await connect(url, **in_memory_auth(token, seed))
    try:
        js = nc.jetstream(timeout=WAIT)
        await js.add_stream(name="T_JS", subjects=["t.js.>"])
        ack = await js.publish("t.js.1", b"stored")
        assert ack.stream == "T_JS" and ack.seq == 1
        info = await js.stream_info("T_JS")
        assert info.state.messages == 1
    finally:
        await nc.close()


async def test_denied_publish_is_reported_and_not_delivered(url: str, keys: BusKeys):
    seed, token = new_user(keys, pub_allow=["t.pub.ok"], sub_allow=[])
    rseed, rtoken = new_user(keys, pub_allow=[], sub_allow=["t.pub.>"])
    watch = Watch()
    sender = await connect(url, watch=watch, **in_memory_auth(token, seed))
    receiver = await connect(url, **in_memory_auth(rtoken, rseed))
    try:
        sub = await receiver.subscribe("t.pub.>")
        await flushed(receiver)  # the interest is registered (hub.core._flush)
        await sender.publish("t.pub.ok", b"probe")
        probe = await sub.next_msg(timeout=WAIT)  # the path works before the violation
        assert (probe.subject, probe.data) == ("t.pub.ok", b"probe")
        await sender.publish("t.pub.secret", b"must not arrive")
        await sender.publish("t.pub.ok", b"fine")
        await flushed(sender)
        exc = await watch.wait_error("permissions violation for publish")
        assert "t.pub.secret" in str(exc)
        # One publisher's messages arrive in order: had the denied one been delivered,
        # it would come before the allowed one sent after it.
        msg = await sub.next_msg(timeout=WAIT)
        assert (msg.subject, msg.data) == ("t.pub.ok", b"fine")
        await nothing_arrives(sub)
        assert sender.is_connected  # a violation is reported, not fatal
    finally:
        await sender.close()
        await receiver.close()


async def test_denied_subscribe_receives_nothing(url: str, keys: BusKeys):
    seed, token = new_user(keys, pub_allow=[], sub_allow=["t.sub.mine"])
    pseed, ptoken = new_user(keys, pub_allow=["t.sub.>"], sub_allow=[])
    watch = Watch()
    listener = await connect(url, watch=watch, **in_memory_auth(token, seed))
    publisher = await connect(url, **in_memory_auth(ptoken, pseed))
    try:
        denied = await listener.subscribe("t.sub.other")
        await flushed(listener)
        await watch.wait_error("permissions violation for subscription")
        await publisher.publish("t.sub.other", b"not for you")
        await flushed(publisher)
        await nothing_arrives(denied)
    finally:
        await listener.close()
        await publisher.close()


async def test_unauthenticated_connect_is_refused(url: str):
    await assert_refused(url)


async def test_user_signed_by_a_foreign_key_is_refused(url: str, keys: BusKeys):
    seed = _jwt.new_seed("user")
    foreign = _jwt.new_seed("account")
    # Claims our account but is signed by a key the account does not list...
    impostor = _jwt.user_jwt(
        _jwt.public_key(seed),
        name="impostor",
        account_public=keys.app_account_public,
        account_signing_seed=foreign,
        pub_allow=[">"],
        sub_allow=[">"],
    )
    await assert_refused(url, **in_memory_auth(impostor, seed))
    # ...or belongs to an account the operator never signed.
    stranger = _jwt.user_jwt(
        _jwt.public_key(seed),
        name="stranger",
        account_public=_jwt.public_key(foreign),
        account_signing_seed=foreign,
        pub_allow=[">"],
        sub_allow=[">"],
    )
    await assert_refused(url, **in_memory_auth(stranger, seed))


async def test_tampered_jwt_is_refused(url: str, keys: BusKeys):
    seed, token = new_user(keys, pub_allow=["t.tamper.own"], sub_allow=["t.tamper.own"])
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["nats"]["pub"] = {"allow": [">"]}
    forged_payload = (
        base64.urlsafe_b64encode(json.dumps(claims, separators=(",", ":")).encode())
        .rstrip(b"=")
        .decode()
    )
    forged = f"{header}.{forged_payload}.{signature}"
    with pytest.raises(_jwt.JwtError):
        _jwt.decode(forged)
    await assert_refused(url, **in_memory_auth(forged, seed))
    nc = await connect(url, **in_memory_auth(token, seed))  # the genuine one still works
    await nc.close()


async def test_jwt_is_disconnected_at_expiry(url: str, keys: BusKeys):
    seed, token = new_user(keys, ttl_seconds=2)
    exp = _jwt.decode(token)["exp"]
    watch = Watch()
    nc = await connect(url, watch=watch, **in_memory_auth(token, seed))
    try:
        await asyncio.wait_for(watch.closed.wait(), timeout=exp - time.time() + WAIT)
        late = time.time() - exp
        print(f"\nexpiry: connection dropped {late * 1000:.0f} ms after exp")
        assert -0.5 <= late <= 2.0
        assert "expired" in str(nc.last_error).lower(), nc.last_error
    finally:
        await nc.close()
    # The server compares whole seconds at connect: within the second after
    # `exp` a connect is still let in (and closed at once); after it, refused.
    await asyncio.sleep(max(0.0, exp + 1.1 - time.time()))
    await assert_refused(url, **in_memory_auth(token, seed))


# --------------------------------------------------------------------------
# Runtime revocation, persistence, rotation (each on a server of its own)
# --------------------------------------------------------------------------


async def test_runtime_revocation_drops_the_connection_and_survives_restart(
    tmp_path: Path, keys: BusKeys
):
    store = tmp_path / "nats"
    server = await start_server(store, keys)
    try:
        seed, token = new_user(keys)
        creds = write_creds(tmp_path / "revoked.creds", token, seed)
        bystander_seed, bystander_token = new_user(keys)
        watch, bystander_watch = Watch(), Watch()
        nc = await connect(server.url, watch=watch, user_credentials=str(creds))
        bystander = await connect(
            server.url, watch=bystander_watch, **in_memory_auth(bystander_token, bystander_seed)
        )

        pushed = time.monotonic()
        await push_account(keys, server.url, {_jwt.public_key(seed): int(time.time())})
        await asyncio.wait_for(watch.closed.wait(), timeout=WAIT)
        latency = watch.closed_at - pushed
        print(f"\nrevocation: connection dropped {latency * 1000:.0f} ms after the push")
        assert latency < 2.0
        assert "revoked" in str(nc.last_error).lower(), nc.last_error
        await assert_refused(server.url, user_credentials=str(creds))
        assert bystander.is_connected and not bystander_watch.closed.is_set()
        await bystander.close()

        # A restart reads the account from the resolver dir: still revoked,
        # although server_config() preloads the (older) JWT without revocations.
        await server.stop()
        server = await start_server(store, keys, port=server.port)
        await assert_refused(server.url, user_credentials=str(creds))
        again = await connect(server.url, **in_memory_auth(bystander_token, bystander_seed))
        await again.close()
    finally:
        await server.stop()


async def test_signing_key_rotation(tmp_path: Path):
    keys = BusKeys.load_or_create(tmp_path / "keys")
    server = await start_server(tmp_path / "nats", keys)
    try:
        old_key = keys.app_signing_keys[-1]
        old_seed, old_token = new_user(keys)
        old_watch = Watch()
        old_nc = await connect(server.url, watch=old_watch, **in_memory_auth(old_token, old_seed))

        new_key = keys.rotate_account_signing_key()
        assert keys.app_signing_keys == [old_key, new_key]
        new_seed, new_token = new_user(keys)
        assert _jwt.decode(new_token)["iss"] == new_key
        await assert_refused(server.url, **in_memory_auth(new_token, new_seed))  # not pushed yet
        await push_account(keys, server.url, {})
        new_nc = await connect(server.url, **in_memory_auth(new_token, new_seed))
        assert old_nc.is_connected  # the old key is still valid

        with pytest.raises(ValueError):
            keys.retire_signing_key(new_key)
        keys.retire_signing_key(old_key)
        await push_account(keys, server.url, {})
        await asyncio.wait_for(old_watch.closed.wait(), timeout=WAIT)
        await assert_refused(server.url, **in_memory_auth(old_token, old_seed))
        assert new_nc.is_connected
        await new_nc.close()
        # The rotation is stored: a reload signs with the new key only.
        assert BusKeys.load_or_create(tmp_path / "keys").app_signing_keys == [new_key]
    finally:
        await server.stop()


# --------------------------------------------------------------------------
# The key store
# --------------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_keys_reload_with_the_same_public_keys(tmp_path: Path):
    first = BusKeys.load_or_create(tmp_path / "keys")
    second = BusKeys.load_or_create(tmp_path / "keys")

    def publics(k):
        return (
            k.operator_public,
            k.system_account_public,
            k.app_account_public,
            k.app_signing_keys,
        )

    assert publics(first) == publics(second)
    assert first.server_config(tmp_path / "r") == second.server_config(tmp_path / "r")
    assert _mode(tmp_path / "keys") == 0o700
    assert _mode(tmp_path / "keys" / "keys.json") == 0o600
    assert _mode(tmp_path / "keys" / "secret.key") == 0o600
    stored = (tmp_path / "keys" / "keys.json").read_text()
    assert first._operator.seed.decode() not in stored  # seeds are encrypted at rest
    assert not list((tmp_path / "keys").glob(".*.tmp"))
    # A lost secret.key is reported, not silently replaced by a new one.
    (tmp_path / "keys" / "secret.key").unlink()
    with pytest.raises(KeyStoreError, match="secret.key is missing"):
        BusKeys.load_or_create(tmp_path / "keys")
    assert not (tmp_path / "keys" / "secret.key").exists()
    (tmp_path / "keys" / "keys.json").write_text("{not json")
    with pytest.raises(KeyStoreError, match="corrupt"):
        BusKeys.load_or_create(tmp_path / "keys", Fernet.generate_key())


def test_secret_key_from_the_environment(tmp_path: Path):
    secret = Fernet.generate_key()
    created = BusKeys.load_or_create(tmp_path / "keys", secret)
    assert not (tmp_path / "keys" / "secret.key").exists()
    assert (
        BusKeys.load_or_create(tmp_path / "keys", secret).operator_public == created.operator_public
    )
    with pytest.raises(KeyStoreError) as wrong:
        BusKeys.load_or_create(tmp_path / "keys", Fernet.generate_key())
    message = str(wrong.value)
    assert (
        message == f"cannot decrypt the bus keys in {(tmp_path / 'keys').resolve()}: "
        "wrong COWORK_SECRET_KEY?"
    )
    assert "\n" not in message
    with pytest.raises(KeyStoreError, match="COWORK_SECRET_KEY"):
        BusKeys.load_or_create(tmp_path / "keys", None)
    with pytest.raises(KeyStoreError, match="not a Fernet key"):
        BusKeys.load_or_create(tmp_path / "other", b"too-short")
