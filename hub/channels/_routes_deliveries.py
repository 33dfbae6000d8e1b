"""Admin API for checking a channel end to end: a test message, and its delivery.

POST /api/v1/tenants/{t}/channel-instances/{id}/test-message {chatId, threadId?, text?}
     -> 202 {deliveryId}: sent through the instance's usual outbound path
GET  /api/v1/tenants/{t}/channel-instances/{id}/deliveries/{deliveryId}
     -> {deliveryId, status (queued|sent|retrying|dead_lettered|duplicate), error, ...}
"""

from __future__ import annotations

import os

from aiohttp import web

from schemas import (
    ChannelOutbound,
    ChannelTarget,
    DeliveryType,
    DeliveryView,
    TestMessage,
    TestMessageQueued,
)

from ..http import HUB_KEY, documented, iso, json_body, json_error, path_token, tenant_param
from ._outbox import delivery_id

BASE = "/api/v1/tenants/{tenant}/channel-instances/{instance_id}"


@documented(
    "Send a test message to a chat through the instance (as any reply goes)",
    body=TestMessage,
    response=TestMessageQueued,
    status=202,
)
async def send_test_message(request: web.Request) -> web.Response:
    hub = request.app[HUB_KEY]
    tenant, instance_id = tenant_param(request), path_token(request, "instance_id")
    body = await json_body(request, TestMessage)
    await hub.channels.get(tenant, instance_id)  # 404 for an unknown instance
    delivery = delivery_id("console-test", instance_id, body.chat_id, os.urandom(8).hex())
    await hub.channel_outbox.send(
        tenant,
        instance_id,
        ChannelOutbound(
            delivery_id=delivery,
            idempotency_key=delivery,
            type=DeliveryType.TEXT,
            target=ChannelTarget(chat_id=body.chat_id, thread_id=body.thread_id),
            text=body.text,
            notice=True,  # a failure is shown here, not announced in the chat
        ),
    )
    return web.json_response({"deliveryId": delivery}, status=202)


@documented("A delivery's status (a test message's, or any other)", response=DeliveryView)
async def get_delivery(request: web.Request) -> web.Response:
    hub = request.app[HUB_KEY]
    tenant, instance_id = tenant_param(request), path_token(request, "instance_id")
    row = await hub.channel_outbox.status(tenant, path_token(request, "delivery_id"))
    if row is None or row["instance_id"] != instance_id:
        return json_error(404, "channel.unknown_delivery", "no such delivery of this instance")
    stamps = {"created_at": iso(row["created_at"]), "updated_at": iso(row["updated_at"])}
    view = DeliveryView.model_validate(
        {**{name: row[name] for name in DeliveryView.model_fields if name in row}, **stamps}
    )
    return web.json_response(view.model_dump(mode="json", by_alias=True))


def add_routes(app: web.Application) -> None:
    app.router.add_post(BASE + "/test-message", send_test_message)
    app.router.add_get(BASE + "/deliveries/{delivery_id}", get_delivery)
