"""`stored` (hub/core/_lanes.py) reads a JetStream message's stream sequence and
stored time from its ack subject as nats-py's `msg.metadata` does, for both forms
of the subject (without and with a domain and account hash), and refuses a
message that is not JetStream's as nats-py does."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.aio.msg import Msg
from nats.errors import NotJSMessageError

from hub.core._lanes import stored

_SEQ = st.integers(min_value=1, max_value=2**63 - 1)
_NS = st.integers(min_value=0, max_value=4_102_444_800 * 10**9)  # up to 2100


def _msg(reply: str) -> Msg:
    return Msg(_client=None, subject="cw.t.device.d.evt.session", reply=reply, data=b"")


def _check(reply: str) -> None:
    seq, at = stored(_msg(reply))
    metadata = _msg(reply).metadata
    assert seq == metadata.sequence.stream
    assert abs(at - metadata.timestamp.timestamp()) < 1e-6  # (a datetime keeps microseconds)


@given(_SEQ, _SEQ, _NS, st.integers(min_value=0, max_value=10**9))
def test_the_form_without_a_domain(stream_seq, consumer_seq, ns, pending):
    _check(f"$JS.ACK.CW_DEVICE_EVENTS.hub-projector.1.{stream_seq}.{consumer_seq}.{ns}.{pending}")


@given(_SEQ, _SEQ, _NS, st.sampled_from(["_", "hub", "leaf-1"]))
def test_the_form_with_a_domain_and_account_hash(stream_seq, consumer_seq, ns, domain):
    _check(
        f"$JS.ACK.{domain}.ACCHASH.CW_DEVICE_EVENTS.hub-projector.2.{stream_seq}."
        f"{consumer_seq}.{ns}.0.rand"
    )


@pytest.mark.parametrize(
    "reply", ["", "_INBOX.abc.1", "$JS.ACK.S.C.1.2.3", "$JS.NAK.S.C.1.2.3.4.5"]
)
def test_what_is_not_a_jetstream_message_is_refused_as_nats_py_refuses_it(reply):
    with pytest.raises(NotJSMessageError):
        stored(_msg(reply))
