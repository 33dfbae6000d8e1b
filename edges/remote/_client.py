"""The controller client: enrol, sign and send commands, read and open events.

It speaks only the hub's HTTP API (the same calls an admin tool makes), so the
hub relays everything, and holds no key that signs or opens any of it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, Literal

import httpx
from pydantic import ValidationError

from schemas import SealedContent, SealError, content_aad, new_id

from ..common import ControllerKeys, InviteLink
from ._store import ControllerStore, PairingLink

WAIT_SECONDS = 30


class RemoteError(RuntimeError):
    """The hub or the Desktop said no, or the answer does not open; `code` says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class RemoteClient:
    def __init__(
        self,
        store: ControllerStore,
        link: PairingLink,
        token: str,
        *,
        keys: ControllerKeys | None = None,
        timeout: float = 70.0,
    ) -> None:
        self.store, self.link = store, link
        self.keys = keys or store.load_keys()
        self._http = httpx.AsyncClient(
            base_url=link.hub_url.rstrip("/"),
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
        )
        self._base = f"/api/v1/tenants/{link.tenant}/pairings/{link.pairing_id}"
        self._events = "/".join(
            ("/api/v1/tenants", link.tenant, "workspaces", link.pairing_id, "events")
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> RemoteClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # --- enrolment --------------------------------------------------------------------
    async def request_enrolment(self, expect_desktop: str | None = None) -> dict[str, Any]:
        """Ask the Desktop (through the hub) to enrol this controller; it waits for a
        person there. Returns the fingerprints to compare: this controller's (to
        approve on the Desktop) and the Desktop's (as `cowork desktop controllers
        list` shows it there). With `expect_desktop`, a different Desktop key is refused:
        the hub could have put its own in the answer."""
        public = self.keys.public
        view = await self._submit(self._enrol_body())
        result = view.get("result") or {}
        data = result.get("data") or {}
        if result.get("code") != "controller.pending_approval" or "desktopKey" not in data:
            raise RemoteError(
                result.get("code") or "controller.no_answer",
                result.get("message") or f"the Desktop did not take the request ({view['state']})",
            )
        if data.get("controllerFingerprint") != public.fingerprint:
            raise RemoteError("controller.fingerprint_mismatch", "the request was altered")
        if expect_desktop and data["desktopFingerprint"] != expect_desktop.upper():
            raise RemoteError(
                "controller.desktop_mismatch",
                f"the Desktop key in the answer has fingerprint {data['desktopFingerprint']}, "
                f"not {expect_desktop}: do not use this pairing",
            )
        self.link = PairingLink(
            self.link.pairing_id,
            self.link.tenant,
            self.link.hub_url,
            data["desktopKey"],
            data["desktopFingerprint"],
        )
        self.store.save_link(self.link)
        self.store.audit("controller.enrolment_requested", pairingId=self.link.pairing_id)
        return {
            "controllerFingerprint": public.fingerprint,
            "desktopFingerprint": data["desktopFingerprint"],
        }

    def _enrol_body(self, invite: InviteLink | None = None) -> dict[str, Any]:
        """A `controller.enrol` command: this controller's public keys, and the invite
        (its secret sealed to the Desktop, bound to these keys) when there is one."""
        public = self.keys.public
        payload: dict[str, Any] = {
            "label": public.label,
            "signingKey": public.signing_key,
            "encryptionKey": public.encryption_key,
        }
        if invite is not None:
            payload["invite"] = invite.present(public).model_dump(mode="json", by_alias=True)
        return {"id": new_id(), "kind": "controller.enrol", "payload": payload}

    async def enrol_with_invite(self, invite: InviteLink) -> dict[str, Any]:
        """Present a one-time invite made on the Desktop (`cowork desktop controllers
        invite`): enrolled at once, with no fingerprint to compare. The Desktop key
        comes from the link (read off the Desktop's screen), never from the hub's
        answer. RemoteError with the Desktop's code if it refuses (`invite.used`,
        `invite.expired`, `invite.unknown`, `invite.invalid`)."""
        if (invite.tenant, invite.pairing_id) != (self.link.tenant, self.link.pairing_id):
            raise RemoteError("controller.wrong_pairing", "the invite is for another pairing")
        public = self.keys.public
        view = await self._submit(self._enrol_body(invite))
        result = view.get("result") or {}
        if result.get("code") != "controller.enrolled":
            raise RemoteError(
                result.get("code") or "controller.no_answer",
                result.get("message") or f"the Desktop did not take the invite ({view['state']})",
            )
        data = result.get("data") or {}
        if data.get("controllerFingerprint") != public.fingerprint:
            raise RemoteError("controller.fingerprint_mismatch", "the request was altered")
        if data.get("desktopKey") != invite.desktop_key:
            raise RemoteError(
                "controller.desktop_mismatch",
                "the answer names another Desktop key than the invite: do not use this pairing",
            )
        self.link = PairingLink(
            self.link.pairing_id,
            self.link.tenant,
            self.link.hub_url,
            invite.desktop_key,
            invite.desktop_fingerprint,
        )
        self.store.save_link(self.link)
        self.store.audit("controller.enrolled_by_invite", pairingId=self.link.pairing_id)
        return {
            "controllerFingerprint": public.fingerprint,
            "desktopFingerprint": invite.desktop_fingerprint,
        }

    # --- commands ---------------------------------------------------------------------
    async def send(
        self,
        kind: str,
        session_id: str | None = None,
        payload: dict | None = None,
        *,
        workspace_id: str = "local",
        wait: int = WAIT_SECONDS,
        lifetime: float = 300.0,
    ) -> dict[str, Any]:
        """Sign and send one command; the command's view with its result opened."""
        body = self.signed_body(kind, session_id, payload, workspace_id, lifetime)
        return self.open_view(await self._submit(body, wait))

    def signed_body(
        self,
        kind: str,
        session_id: str | None,
        payload: dict | None,
        workspace_id: str = "local",
        lifetime: float = 300.0,
        *,
        sequence: int | None = None,
        issued_at: float | None = None,
    ) -> dict[str, Any]:
        """The JSON body of POST …/commands for a signed command (not sent)."""
        if self.link.desktop_key is None:
            raise RemoteError("controller.not_enrolled", "request enrolment first")
        command_id = new_id()
        signed = self.keys.sign(
            tenant=self.link.tenant,
            pairing_id=self.link.pairing_id,
            command_id=command_id,
            sequence=sequence or self.store.take_sequence(self.link.pairing_id),
            kind=kind,
            workspace_id=workspace_id,
            session_id=session_id,
            payload=payload,
            desktop_key=self.link.desktop_key,
            lifetime=lifetime,
            issued_at=issued_at,
        )
        body: dict[str, Any] = {
            "id": command_id,
            "kind": kind,
            "workspaceId": workspace_id,
            "signed": signed.model_dump(mode="json", by_alias=True),
        }
        if session_id:
            body["sessionId"] = session_id
        return body

    async def submit_body(self, body: dict[str, Any], wait: int = WAIT_SECONDS) -> dict[str, Any]:
        return self.open_view(await self._submit(body, wait))

    async def _submit(self, body: dict[str, Any], wait: int = WAIT_SECONDS) -> dict[str, Any]:
        response = await self._http.post(f"{self._base}/commands", params={"wait": wait}, json=body)
        if response.status_code not in (200, 201):
            raise RemoteError(f"hub.{response.status_code}", _error_text(response))
        return dict(response.json())

    async def command(self, command_id: str, wait: int = 0) -> dict[str, Any]:
        response = await self._http.get(
            f"{self._base}/commands/{command_id}", params={"wait": wait}
        )
        if response.status_code != 200:
            raise RemoteError(f"hub.{response.status_code}", _error_text(response))
        return self.open_view(response.json())

    def _open(self, sealed: Any, purpose: Literal["event", "result"], id: str) -> Any:
        """The JSON inside a SealedContent object, or SealError (malformed too: it came
        through the hub)."""
        try:
            content = SealedContent.model_validate(sealed)
            aad = content_aad(self.link.tenant, self.link.pairing_id, purpose, id)
            return json.loads(self.keys.open(content, aad))
        except (ValidationError, ValueError) as exc:  # SealError is a ValueError
            raise SealError(str(exc).splitlines()[0]) from None

    def open_view(self, view: dict[str, Any]) -> dict[str, Any]:
        """A command's view with its sealed result opened. `sealed` says whether the
        result came sealed (from the Desktop, unforgeable) or in clear (a refusal, an
        enrolment answer, a hub-trust pairing: only as good as the hub's word)."""
        result = view.get("result")
        if not result or not result.get("sealed"):
            return {**view, "sealed": False}
        try:
            opened = self._open(result["sealed"], "result", view["commandId"])
        except SealError as exc:
            raise RemoteError("sealed.unreadable", f"the result does not open: {exc}") from None
        return {**view, "result": opened, "sealed": True}

    # --- events -----------------------------------------------------------------------
    def open_event(self, item: dict[str, Any]) -> dict[str, Any]:
        """An event of the hub's log with its payload opened, and `sealed: true`. One
        this controller holds no key for (made before it was enrolled or after it was
        removed) or that fails authentication comes back with `payload: null` and
        `sealedError`. One in clear comes back as it is with `sealed: false`: from a
        sealed pairing that is the hub's word, not the Desktop's."""
        payload = item.get("payload") or {}
        if "sealed" not in payload:
            return {**item, "sealed": False}
        try:
            opened = self._open(payload["sealed"], "event", item["id"])
        except SealError as exc:
            return {**item, "payload": None, "sealed": True, "sealedError": str(exc)}
        return {**item, "payload": opened, "sealed": True}

    async def events(self, after: int = 0, limit: int = 500) -> list[dict[str, Any]]:
        """Every event after `after`, opened, page by page."""
        items: list[dict[str, Any]] = []
        while True:
            response = await self._http.get(self._events, params={"after": after, "limit": limit})
            if response.status_code != 200:
                raise RemoteError(f"hub.{response.status_code}", _error_text(response))
            page = response.json()["items"]
            if not page:
                return items
            items += [self.open_event(i) for i in page]
            after = page[-1]["sequence"]

    async def follow(self, after: int = 0) -> AsyncIterator[dict[str, Any]]:
        """The live tail (SSE), resumed after `after`, each event opened as it comes."""
        headers = {"Accept": "text/event-stream", "Last-Event-ID": str(after)}
        async with self._http.stream("GET", self._events, headers=headers, timeout=None) as r:
            if r.status_code != 200:
                raise RemoteError(f"hub.{r.status_code}", (await r.aread()).decode()[:500])
            data: list[str] = []
            async for line in r.aiter_lines():
                if line.startswith("data:"):
                    data.append(line[5:].strip())
                elif line == "" and data:
                    yield self.open_event(json.loads("\n".join(data)))
                    data = []


def _error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return f"{error.get('code')}: {error.get('message')}"[:500]
    return str(body)[:500]
