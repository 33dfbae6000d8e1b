"""Fuzzing every provider's inbound parse(): whatever a (verified) request holds,
parse() returns a WebhookResult or raises a ChannelError (answered 4xx), never
anything else (which would be a 500 and a traceback)."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qsl, urlencode

import httpx
import pytest
from fakeplatforms import FAKES, webhook_request
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import channels
from channels import ChannelError, InstanceConfig, WebhookResult

KINDS = sorted(channels.PROVIDERS)
FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=10,
)


class Subject:
    """A provider of one kind plus a real signed request from its fake, as a template."""

    def __init__(self, kind: str, fake) -> None:
        cls = channels.PROVIDERS[kind]
        config = InstanceConfig(
            tenant="acme",
            instance_id=f"{kind}-fuzz",
            kind=kind,
            workspace_id="ws1",
            settings=cls.settings_model.model_validate(fake.instance_settings()),
            secrets=cls.secrets_model.model_validate(fake.instance_secrets()),
        )
        self.provider = cls(config, httpx.AsyncClient())
        templates = [fake.signed_message("hello /status now", event_id="7")]
        press = fake.signed_button_press("tok", event_id="8")
        if press is not None:
            templates.append(press)
        self.templates = templates

    def parse(self, body: bytes, headers: dict[str, str]) -> None:
        request = webhook_request(body, headers)
        try:
            result = self.provider.parse(request)
        except ChannelError as exc:
            assert 400 <= exc.status < 500 and exc.code and exc.message
            return
        assert isinstance(result, WebhookResult)


@pytest.fixture(params=KINDS, scope="module")
async def subject(request: pytest.FixtureRequest):
    kind = request.param
    if kind not in FAKES:
        pytest.fail(f"provider kind {kind!r} has no fake platform in FAKES")
    fake = FAKES[kind]()
    await fake.start()  # some fakes' settings name their server's address
    try:
        yield Subject(kind, fake)
    finally:
        await fake.stop()


def content_headers(template) -> dict[str, str]:
    return {k: v for k, v in template.headers.items() if k.lower() == "content-type"}


@FUZZ
@given(body=st.binary(max_size=600), which=st.integers(min_value=0, max_value=1))
def test_arbitrary_bytes(subject: Subject, body: bytes, which: int) -> None:
    template = subject.templates[which % len(subject.templates)]
    subject.parse(body, content_headers(template))


@FUZZ
@given(value=json_values, which=st.integers(min_value=0, max_value=1))
def test_arbitrary_json(subject: Subject, value: Any, which: int) -> None:
    template = subject.templates[which % len(subject.templates)]
    subject.parse(json.dumps(value).encode(), content_headers(template))


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    found = [prefix]
    if isinstance(node, dict):
        for key, child in node.items():
            found += _paths(child, prefix + (key,))
    elif isinstance(node, list):
        for index, child in enumerate(node):
            found += _paths(child, prefix + (index,))
    return found


def _replaced(node: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(node, dict):
        return {**node, head: _replaced(node[head], rest, value)}
    copy = list(node)
    copy[head] = _replaced(copy[head], rest, value)
    return copy


def _mutate_json(document: Any, data: st.DataObject) -> Any:
    """The platform's own payload with a few fields swapped for wrongly typed values."""
    for _ in range(data.draw(st.integers(min_value=1, max_value=3))):
        paths = _paths(document)
        path = paths[data.draw(st.integers(min_value=0, max_value=len(paths) - 1))]
        document = _replaced(document, path, data.draw(json_values))
    return document


@FUZZ
@given(data=st.data())
def test_plausible_payloads_with_wrong_types(subject: Subject, data: st.DataObject) -> None:
    template = data.draw(st.sampled_from(subject.templates))
    headers = content_headers(template)
    try:
        document = json.loads(template.body)
    except ValueError:
        document = None
    if isinstance(document, (dict, list)):
        body = json.dumps(_mutate_json(document, data)).encode()
    else:  # a form (Slack commands and interactivity) or another text format
        try:
            form = dict(
                parse_qsl(template.body.decode(), keep_blank_values=True, strict_parsing=True)
            )
        except ValueError:
            form = {}
        if form:
            key = data.draw(st.sampled_from(sorted(form)))
            if key == "payload":
                form[key] = json.dumps(_mutate_json(json.loads(form[key]), data))
            else:
                form[key] = data.draw(st.one_of(st.text(max_size=40), json_values.map(json.dumps)))
            body = urlencode(form).encode()
        else:  # free text: splice in arbitrary characters
            text = template.body.decode(errors="replace")
            at = data.draw(st.integers(min_value=0, max_value=len(text)))
            body = (text[:at] + data.draw(st.text(max_size=60)) + text[at:]).encode()
    subject.parse(body, headers)
