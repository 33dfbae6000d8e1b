"""Calling a chat platform's HTTP API: one place that turns transport errors and
HTTP answers into `DeliveryFailed` with the right retry semantics.

- transport errors and timeouts, 5xx: retryable (`permanent=False`);
- 429: retryable with `retry_after` from the `Retry-After` header, Telegram's
  body `parameters.retry_after` or Slack/Discord's body `retry_after`;
- other 4xx: permanent (retrying the same request cannot help).

Messages name the operation, never the URL: Telegram puts the bot token in the
URL path, so a URL in an exception would leak it into logs and receipts.

A call given a `pin` policy (a provider whose operator set `apiBase`) goes
through the generic webhook's SSRF protection (channels/_ssrf.py) on every
call: the host is resolved once, every address checked, and the connection
pinned to the checked address, so a name that later resolves (rebinds) to a
loopback, private or metadata address never receives the bot's secret. A
refusal is a permanent failure whose code is the rule's (`ssrf.loopback`, ...).
"""

from __future__ import annotations

import base64
import binascii
import json as jsonlib
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from schemas import ChannelFile

from .. import _ssrf
from .._provider import DeliveryFailed

_DETAIL_LIMIT = 200  # characters of a platform's error description kept in a message


def _number(value: Any) -> float | None:
    """A non-negative finite number of seconds, or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if isinstance(value, (int, float)) and math.isfinite(value) and value >= 0:
        return float(value)
    return None


def retry_after_of(headers: Mapping[str, str], body: Any) -> float | None:
    """How long the platform asked us to wait, from the header or the body."""
    header = headers.get("retry-after")
    if header:
        seconds = _number(header)
        if seconds is not None:
            return seconds
        try:  # HTTP-date form
            when = parsedate_to_datetime(header)
            if when.tzinfo is None:
                when = when.replace(tzinfo=UTC)
            return max(0.0, (when - datetime.now(UTC)).total_seconds())
        except (TypeError, ValueError, IndexError):
            pass
    if isinstance(body, dict):
        params = body.get("parameters")
        if isinstance(params, dict):
            seconds = _number(params.get("retry_after"))
            if seconds is not None:
                return seconds
        seconds = _number(body.get("retry_after"))
        if seconds is not None:
            return seconds
        millis = _number(body.get("retry_after_ms"))  # Matrix M_LIMIT_EXCEEDED
        return None if millis is None else millis / 1000
    return None


def error_detail(body: Any) -> str:
    """A short, secret-free description from a platform's error body."""
    detail = ""
    if isinstance(body, dict):
        for key in ("description", "error", "message"):
            value = body.get(key)
            if isinstance(value, str) and value:
                detail = value
                break
    elif isinstance(body, str):
        detail = body
    detail = " ".join(detail.split())
    return detail[:_DETAIL_LIMIT]


def failure_for_status(
    operation: str, status: int, headers: Mapping[str, str], body: Any
) -> DeliveryFailed:
    detail = error_detail(body)
    suffix = f": {detail}" if detail else ""
    if status == 429:
        return DeliveryFailed(
            f"{operation}: rate limited (HTTP 429){suffix}",
            code="rate_limited",
            retry_after=retry_after_of(headers, body),
            status=status,
        )
    if status >= 500:
        return DeliveryFailed(
            f"{operation}: platform error (HTTP {status}){suffix}",
            code="platform.unavailable",
            status=status,
        )
    return DeliveryFailed(
        f"{operation}: rejected (HTTP {status}){suffix}",
        code="platform.rejected",
        permanent=True,
        status=status,
    )


def _decode(response: httpx.Response) -> Any:
    if not response.content:
        return None
    try:
        return jsonlib.loads(response.content)
    except (ValueError, UnicodeDecodeError):
        return response.text


async def call_json(
    http: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    operation: str = "platform call",
    json: Any = None,
    data: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
    files: Any = None,
    timeout: float | None = 30.0,
    pin: _ssrf.UrlPolicy | None = None,
    resolve: _ssrf.Resolver | None = None,
) -> tuple[int, Any]:
    """One API call. Returns (status, decoded JSON body, or None when empty) for a
    2xx answer; raises DeliveryFailed for everything else. A 2xx whose body is
    not JSON is returned as text; callers that need JSON check the type. With
    `pin`, the call is resolved, checked and pinned first (see `send_request`)."""
    request = http.build_request(
        method, url, json=json, data=data, headers=headers, files=files, timeout=timeout
    )
    return await send_request(http, request, operation=operation, pin=pin, resolve=resolve)


async def pin_to_checked_address(
    request: httpx.Request,
    policy: _ssrf.UrlPolicy,
    *,
    operation: str,
    resolve: _ssrf.Resolver | None = None,
) -> httpx.Request:
    """The SSRF policy applied to a built request before anything is sent: its URL
    re-checked, its host resolved once (`resolve`, or the system resolver), every
    address checked, and the request pointed at the checked address. A refusal is
    a permanent DeliveryFailed coded by the rule; the message names the host or
    address, never the URL (which may carry a token in its path)."""
    try:
        target = await _ssrf.pin(request.url, policy, resolve)
    except _ssrf.UnsafeUrl as exc:
        raise DeliveryFailed(f"{operation}: {exc}", code=exc.code, permanent=True) from None
    return _ssrf.pin_request(request, target)


async def send_request(
    http: httpx.AsyncClient,
    request: httpx.Request,
    *,
    operation: str,
    redirect_code: str = "platform.redirect",
    pin: _ssrf.UrlPolicy | None = None,
    resolve: _ssrf.Resolver | None = None,
) -> tuple[int, Any]:
    """Send a built request (redirects never followed) and map the answer as
    `call_json` does; `redirect_code` names why a redirect is refused. With
    `pin` (an operator-set address), the request first goes through
    `pin_to_checked_address`: nothing is sent when the policy refuses."""
    if pin is not None:
        request = await pin_to_checked_address(request, pin, operation=operation, resolve=resolve)
    try:
        response = await http.send(request, follow_redirects=False)
    except httpx.TimeoutException:
        raise DeliveryFailed(f"{operation}: timed out", code="transport.timeout") from None
    except httpx.HTTPError as exc:
        # httpx messages may carry the URL (and with it a token): class name only.
        raise DeliveryFailed(
            f"{operation}: transport error ({type(exc).__name__})", code="transport.error"
        ) from None
    body = _decode(response)
    if 200 <= response.status_code < 300:
        return response.status_code, body
    if 300 <= response.status_code < 400:
        raise DeliveryFailed(
            f"{operation}: redirect not followed (HTTP {response.status_code})",
            code=redirect_code,
            permanent=True,
            status=response.status_code,
        )
    raise failure_for_status(operation, response.status_code, response.headers, body)


def require_object(operation: str, body: Any) -> dict[str, Any]:
    """The body as a JSON object, or a retryable failure (a proxy's HTML page...)."""
    if not isinstance(body, dict):
        raise DeliveryFailed(
            f"{operation}: the platform answered something other than a JSON object",
            code="platform.bad_response",
        )
    return body


# --- checks every provider makes on a delivery before calling its platform -------------
def invalid(message: str) -> DeliveryFailed:
    """A delivery this platform can never accept as given: permanent."""
    return DeliveryFailed(message, code="delivery.invalid", permanent=True)


def unsupported(kind: str, what: str) -> DeliveryFailed:
    return DeliveryFailed(
        f"{kind} does not support {what}", code="delivery.unsupported", permanent=True
    )


def require_text(delivery: Any, max_length: int) -> str:
    text = delivery.text
    if not text:
        raise invalid(f"a {delivery.type} delivery needs text")
    if len(text) > max_length:
        raise invalid(f"text is {len(text)} characters; the limit is {max_length}")
    return text


def require_reaction(delivery: Any) -> tuple[str, str]:
    """(emoji, message id) of a reaction delivery (the contract requires both; a
    delivery built in code without validation is caught here)."""
    emoji, message = delivery.reaction, delivery.target.message_id
    if not emoji or not message:
        raise invalid("a reaction needs its emoji and the message id it reacts to")
    return emoji, message


def check_buttons(delivery: Any, limits: Any) -> list[list[Any]]:
    """The delivery's button rows, checked against the platform's ButtonLimits."""
    rows = [row for row in (delivery.buttons or []) if row]
    if not rows:
        return []
    if limits is None:
        raise DeliveryFailed(
            "this platform has no buttons", code="delivery.unsupported", permanent=True
        )
    count = sum(len(row) for row in rows)
    if len(rows) > limits.max_rows or count > limits.max_count:
        raise invalid(
            f"{count} buttons in {len(rows)} rows exceed the platform's "
            f"{limits.max_count} in {limits.max_rows} rows"
        )
    for row in rows:
        for button in row:
            size = len(button.token.encode())
            if not 1 <= size <= limits.max_token_bytes:
                raise invalid(
                    f"a button token is {size} bytes; the platform allows 1-"
                    f"{limits.max_token_bytes}"
                )
            if not button.label.strip():
                raise invalid("a button needs a label")
    return rows


def file_bytes(delivery: Any, max_bytes: int) -> tuple[ChannelFile, bytes]:
    """The file of a file delivery, and its decoded content (at most `max_bytes`)."""
    file: ChannelFile | None = delivery.file
    if file is None:
        raise invalid("a file delivery needs a file")
    try:
        content = base64.b64decode(file.content_base64, validate=True)
    except (binascii.Error, ValueError):
        raise invalid("the file content is not valid base64") from None
    if len(content) > max_bytes:
        raise invalid(f"the file is {len(content)} bytes; the limit is {max_bytes}")
    return file, content


def checked_socket_url(url: Any, policy: _ssrf.UrlPolicy | None, operation: str) -> str:
    """A websocket URL a platform handed us (Discord's Gateway, Slack's Socket Mode),
    which the bot's credential goes to: wss only, or under the instance's SSRF
    rules when the operator chose the API base (a local fake may then be ws on
    loopback). A refusal is a permanent DeliveryFailed."""
    if not isinstance(url, str) or not url.startswith(("wss://", "ws://")):
        raise DeliveryFailed(f"{operation}: no websocket URL", code="platform.bad_response")
    try:
        if policy is not None:
            _ssrf.check_url("http" + url[2:], policy)  # ws -> http, wss -> https
        elif not url.startswith("wss://"):
            raise _ssrf.UnsafeUrl("ssrf.scheme", "only wss URLs are allowed")
    except _ssrf.UnsafeUrl as exc:
        raise DeliveryFailed(f"{operation}: {exc}", code=exc.code, permanent=True) from None
    return url
