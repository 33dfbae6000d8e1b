"""Teams: Bot Framework tokens, checked against the keys the (fake) Bot Framework
publishes through its OpenID metadata: a token signed by a key that is not
published, for another audience, expired or not yet valid, for another service
URL, or not RS256, is refused; a rotated key is learnt."""

from __future__ import annotations

import asyncio
import base64
import json

import httpx
import pytest
from fakeplatforms import FAKES
from fakeplatforms.teams import FakeTeams

import channels
from channels import InstanceConfig, VerificationFailed


@pytest.fixture
async def teams():
    fake: FakeTeams = FAKES["teams"]()  # type: ignore[assignment]
    await fake.start()
    async with httpx.AsyncClient() as http:
        cls = channels.PROVIDERS["teams"]
        config = InstanceConfig(
            tenant="acme",
            instance_id="teams-sig",
            kind="teams",
            workspace_id="ws1",
            settings=cls.settings_model.model_validate(fake.instance_settings()),
            secrets=cls.secrets_model.model_validate(fake.instance_secrets()),
        )
        provider = cls(config, http)
        await provider.probe()  # fetches a token and the published keys
        yield fake, provider
    await fake.stop()


def activity(fake: FakeTeams) -> dict:
    return json.loads(fake.signed_message("hello").body)


async def test_a_token_from_the_published_key_is_accepted(teams) -> None:
    fake, provider = teams
    provider.verify(fake.signed_activity(activity(fake)))


@pytest.mark.parametrize(
    "token, code",
    [
        ({"key": "unpublished"}, "signature.unknown_key"),
        ({"audience": "00000000-0000-0000-0000-000000000000"}, "signature.invalid"),
        ({"expires_in": -400}, "signature.stale"),
        ({"service_url": "https://evil.example/teams"}, "signature.invalid"),
    ],
    ids=["unpublished-key", "wrong-audience", "expired", "other-service-url"],
)
async def test_bad_tokens_are_refused(teams, token, code) -> None:
    fake, provider = teams
    if token.get("key") == "unpublished":
        # An unpublished key under a published kid fails the signature; under its own
        # kid it is an unknown key: both refused.
        token = {**token, "key": fake.unpublished}
        with pytest.raises(VerificationFailed) as caught:
            provider.verify(fake.signed_activity(activity(fake), **token))
        assert caught.value.code == "signature.invalid"
        fake.kid, published = "kid-never-published", fake.kid
        with pytest.raises(VerificationFailed) as caught:
            provider.verify(fake.signed_activity(activity(fake), **token))
        fake.kid = published
    else:
        with pytest.raises(VerificationFailed) as caught:
            provider.verify(fake.signed_activity(activity(fake), **token))
    assert caught.value.code == code, caught.value.message


async def test_a_missing_or_malformed_bearer_and_other_algorithms_are_refused(teams) -> None:
    fake, provider = teams
    request = fake.signed_activity(activity(fake))
    for header in ("", "Basic abc", "Bearer not.a.jwt", "Bearer a.b"):
        headers = {**dict(request.headers), "Authorization": header}
        with pytest.raises(VerificationFailed):
            provider.verify(type(request)(**{**request.__dict__, "headers": headers}))
    good = request.headers["Authorization"][7:]
    head, claims, signature = good.split(".")
    none_alg = base64.urlsafe_b64encode(b'{"alg":"none","kid":"x"}').rstrip(b"=").decode()
    headers = {**dict(request.headers), "Authorization": f"Bearer {none_alg}.{claims}."}
    with pytest.raises(VerificationFailed):
        provider.verify(type(request)(**{**request.__dict__, "headers": headers}))


async def test_a_rotated_key_is_learnt_from_the_metadata(teams) -> None:
    fake, provider = teams
    provider._keys_at = 0.0  # the last refresh is long past
    fake.key, fake.kid = fake.unpublished, "kid-rotated"  # the Bot Framework rotated
    request = fake.signed_activity(activity(fake))
    with pytest.raises(VerificationFailed):
        provider.verify(request)  # unknown yet: refused, and a refresh starts
    for _ in range(100):
        await asyncio.sleep(0.02)
        try:
            provider.verify(request)
            return
        except VerificationFailed:
            continue
    pytest.fail("the rotated key was not learnt")
