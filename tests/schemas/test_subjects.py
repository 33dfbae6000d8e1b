"""The subject taxonomy: builders, parsers, wildcards and token safety."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import subjects
from schemas.subjects import FAMILIES, SubjectError

EVERY_FAMILY = pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)


def sample_values(family):
    return {p: ("acme" if p == "tenant" else f"{p.replace('_', '-')}-1") for p in family.params}


@EVERY_FAMILY
def test_build_then_parse_round_trips(family):
    values = sample_values(family)
    subject = family.build(**values)
    assert family.parse(subject) == values
    assert subjects.family_of(subject) is family
    assert "*" not in subject and ">" not in subject


@EVERY_FAMILY
def test_filter_uses_wildcards_for_missing_params_only(family):
    pattern = family.filter()
    assert pattern.count("*") == len(family.params)
    if "tenant" in family.params:
        scoped = family.filter(tenant="acme")
        assert scoped.split(".")[1] == "acme"
        assert subjects.covers(pattern, scoped)


@EVERY_FAMILY
def test_every_param_is_required_by_build(family):
    values = sample_values(family)
    for name in family.params:
        partial = {k: v for k, v in values.items() if k != name}
        with pytest.raises(SubjectError, match=name):
            family.build(**partial)


def test_tenant_is_second_token_of_every_tenant_scoped_family():
    for family in FAMILIES:
        if "tenant" in family.params:
            assert family.tokens[1] == "{tenant}", family.name
        else:
            assert family.tokens[1] in {"bootstrap", "system"}, family.name


def test_no_two_families_can_match_one_subject():
    assert list(subjects.overlapping_pairs()) == []


def test_stream_subjects_do_not_overlap_across_streams():
    declared = subjects.streams()
    flat = [(name, s) for name, subs in declared.items() for s in subs]
    for i, (name_a, a) in enumerate(flat):
        for name_b, b in flat[i + 1 :]:
            assert not subjects.covers(a, b) and not subjects.covers(b, a), (name_a, a, name_b, b)


@pytest.mark.parametrize(
    "bad",
    [
        "a.b",
        "a*",
        ">",
        "a b",
        "tab\there",
        "",
        "x" * 129,
        "new\nline",
        "ünïcode",
        "$SYS",
        "a/b",
    ],
)
def test_injected_tokens_are_refused(bad):
    with pytest.raises(SubjectError):
        subjects.DEVICE_COMMAND.build(tenant="acme", device_id=bad)


@pytest.mark.parametrize("tenant", ["bootstrap", "system", "Acme", "-acme", "a.b", "*"])
def test_reserved_or_malformed_tenants_are_refused(tenant):
    with pytest.raises(SubjectError):
        subjects.AUDIT.build(tenant=tenant, principal_kind="desktop", principal_id="d1")


def test_parse_refuses_foreign_and_wildcard_subjects():
    with pytest.raises(SubjectError):
        subjects.DEVICE_COMMAND.parse("cw.acme.device.d1.ack")
    with pytest.raises(SubjectError):
        subjects.DEVICE_COMMAND.parse("cw.acme.device.*.cmd")
    with pytest.raises(SubjectError):
        subjects.family_of("other.acme.device.d1.cmd")


def test_dead_letter_subjects():
    assert subjects.dead_letter_subject("acme", subjects.AUDIT) == "cw.acme.dlq.audit"
    assert subjects.dead_letter_subject(None, subjects.DEVICE_EVENT) == "cw.system.dlq.device-event"


@settings(max_examples=400, deadline=None)
@given(st.text(min_size=0, max_size=140), st.text(min_size=0, max_size=140))
def test_no_id_can_escape_its_token(tenant, device):
    """Whatever the ids, a built subject has exactly the template's tokens and parses back."""
    family = subjects.DEVICE_EVENT
    try:
        subject = family.build(tenant=tenant, device_id=device, event_kind="session")
    except SubjectError:
        return
    parts = subject.split(".")
    assert len(parts) == len(family.tokens)
    assert parts[1] == tenant and parts[3] == device
    assert not any(c in subject for c in "*> \t\r\n")
    assert family.parse(subject) == {"tenant": tenant, "device_id": device, "event_kind": "session"}


@settings(max_examples=200, deadline=None)
@given(st.from_regex(r"[A-Za-z0-9_-]{1,128}", fullmatch=True))
def test_every_valid_token_is_accepted(token):
    subject = subjects.PRESENCE.build(tenant="t1", principal_kind="desktop", principal_id=token)
    assert subjects.PRESENCE.parse(subject)["principal_id"] == token


def test_the_public_face_lists_every_message_and_vocabulary_name():
    """schemas/__init__.py names its exports explicitly (type checkers read them);
    a model added to _messages or _vocabulary must be exported too."""
    import schemas
    from schemas import _messages, _vocabulary

    for name in [*_messages.__all__, *_vocabulary.__all__]:
        assert getattr(schemas, name) is getattr(_messages, name, None) or getattr(
            schemas, name
        ) is getattr(_vocabulary, name, None), name
