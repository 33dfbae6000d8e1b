"""JSON Schema and AsyncAPI 3 documents generated from the models (pure; no I/O).

The committed files under docs/ are written from these functions by
`cowork schema export`; a test fails when they drift from the code.
"""

from __future__ import annotations

from typing import Any

from pydantic.json_schema import models_json_schema

from . import subjects
from ._base import Message
from ._catalog import MESSAGES
from ._envelope import Envelope, envelope_class

ASYNCAPI_VERSION = "3.0.0"
CONTRACT_VERSION = "1.0.0"

_PARAM_HELP = {
    "tenant": "Tenant id: lower-case letters, digits, `_` and `-`; never a reserved root name.",
    "pairing_id": "The pairing record id.",
    "device_id": "The paired Desktop's principal id (its pairing id).",
    "principal_kind": "The kind of principal: desktop, gateway, channel, ...",
    "principal_id": "The principal's id within its kind.",
    "registration_id": "The Gateway registration id.",
    "event_kind": "Coarse event class: session, command or status.",
    "scope": "The sync scope.",
    "work_kind": "The kind of Cloud-owned work (e.g. prompt).",
    "workspace_id": "The workspace id.",
    "instance_id": "The channel provider instance id.",
    "origin": "The family the dead-lettered message came from (dots as dashes).",
}


def _envelope_models() -> dict[str, type[Envelope[Message]]]:
    return {name: envelope_class(model) for name, model in sorted(MESSAGES.items())}


def json_schemas() -> dict[str, dict[str, Any]]:
    """One self-contained JSON Schema per message type: the envelope with its data."""
    out = {}
    for name, model in _envelope_models().items():
        schema = model.model_json_schema(by_alias=True, mode="validation")
        schema["title"] = f"{name} (envelope v1)"
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["$id"] = f"https://cowork-hub.dev/schemas/{name}.json"
        out[name] = schema
    return out


def _component_schemas() -> tuple[dict[str, str], dict[str, Any]]:
    models = _envelope_models()
    keys, top = models_json_schema(
        [(model, "validation") for model in models.values()],
        by_alias=True,
        ref_template="#/components/schemas/{model}",
    )
    refs = {name: keys[(model, "validation")]["$ref"] for name, model in models.items()}
    return refs, top.get("$defs", {})


def _message_id(message_type: str) -> str:
    return message_type.replace(".", "_")


def asyncapi() -> dict[str, Any]:
    """An AsyncAPI 3 document of the whole bus, from the hub's point of view."""
    refs, schemas = _component_schemas()
    messages = {
        _message_id(name): {
            "name": name,
            "title": name,
            "contentType": "application/json",
            "payload": {"$ref": refs[name]},
        }
        for name in sorted(MESSAGES)
    }
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    for family in subjects.FAMILIES:
        channel_id = family.name.replace(".", "_")
        used = [family.message] + ([family.reply] if family.reply else [])
        channels[channel_id] = {
            "address": family.template,
            "title": family.name,
            "summary": family.summary,
            "messages": {
                _message_id(m): {"$ref": f"#/components/messages/{_message_id(m)}"} for m in used
            },
            "parameters": {p: {"description": _PARAM_HELP.get(p, p)} for p in family.params},
            "x-delivery": family.delivery.value,
            "x-publisher": family.publisher,
            "x-consumer": family.consumer,
            **({"x-stream": family.stream} if family.stream else {}),
        }
        operations[channel_id] = _operation(family, channel_id)
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "cowork-hub bus",
            "version": CONTRACT_VERSION,
            "description": (
                "Every NATS subject of cowork-hub. Generated from `schemas/` by "
                "`cowork schema export`; do not edit by hand."
            ),
        },
        "defaultContentType": "application/json",
        "servers": {
            "embedded": {
                "host": "127.0.0.1:4222",
                "protocol": "nats",
                "description": "The NATS server `cowork up` runs.",
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": schemas},
    }


def _operation(family: subjects.SubjectFamily, channel_id: str) -> dict[str, Any]:
    hub_receives = "hub" in family.consumer.split(", ")
    message_ref = f"#/channels/{channel_id}/messages/{_message_id(family.message)}"
    op: dict[str, Any] = {
        "action": "receive" if hub_receives else "send",
        "channel": {"$ref": f"#/channels/{channel_id}"},
        "summary": family.summary,
        "messages": [{"$ref": message_ref}],
    }
    if family.reply:
        op["reply"] = {
            "channel": {"$ref": f"#/channels/{channel_id}"},
            "messages": [{"$ref": f"#/channels/{channel_id}/messages/{_message_id(family.reply)}"}],
        }
    return op
