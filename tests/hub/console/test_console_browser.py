"""The operator console in a real headless Chromium (Debian's `chromium`, driven by
Playwright; `make test` installs it): sign in, pair a Desktop end to end with a
real `cowork desktop pair`, revoke it, connect a Telegram channel, watch the
health center turn NATS offline and back, replay a dead letter; hostile names
shown as text; CSRF and the viewer; keyboard use and labelled controls on every
page. One browser and one hub for the module; a screenshot of each page is
saved under tests/artifacts/console/.

A missing browser is a failure, not a skip: the console is only tested here.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import segno
from desktopkit import cowork, desktop_event, start_desktop
from fakeplatforms.telegram import FakeTelegram
from gateway_agent_kit import start_gateway
from hubkit import client, running_hub
from playwright.async_api import Browser, Page, async_playwright, expect

from edges.local import NatsServer, free_port
from hub.desktop import PAIRING_STATUSES
from hub.desktop._qr import BORDER as QR_BORDER
from hub.desktop._qr import SCALE as QR_SCALE
from hub.gateways import REGISTRATION_STATUSES
from schemas import AuditRecord, Envelope, PrincipalKind, Source, subjects

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "console"
VIEWER = "viewer-token-for-the-browser-tests"
TENANT = "default"
HOSTILE = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script>&amp;'
PHONE = {"width": 390, "height": 844}

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
async def console_nats(tmp_path_factory, bus_keys) -> AsyncIterator[NatsServer]:
    """The hub's own operator-mode NATS, on a fixed port so it can be stopped and
    started again (the health center's offline test)."""
    store = tmp_path_factory.mktemp("console-nats")
    server = NatsServer(
        store_dir=store, port=free_port(), extra_config=bus_keys.server_config(store / "resolver")
    )
    await server.start()
    yield server
    await server.stop()


@pytest.fixture(scope="module")
async def console_hub(console_nats, database_url_module, bus_keys):
    async with running_hub(
        console_nats.url, database_url_module, keys=bus_keys, viewer_token=VIEWER
    ) as hub:
        yield hub


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    assert shutil.which("chromium") or Path(CHROMIUM).exists(), (
        "Debian's chromium is not installed (make test installs it: apt-get install chromium)"
    )
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        yield browser
        await browser.close()


@pytest.fixture(scope="module")
async def page(browser, console_hub) -> AsyncIterator[Page]:
    """The admin's page: a phone-sized window; any script dialog fails the test."""
    context = await browser.new_context(viewport=PHONE, base_url=console_hub.http_url)
    page = await context.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), asyncio.ensure_future(d.dismiss())))
    page.dialogs = dialogs  # type: ignore[attr-defined]
    yield page
    await context.close()


async def shot(page: Page, name: str) -> None:
    await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


async def test_sign_in_rejects_a_wrong_token_and_accepts_the_admin_token(page, console_hub):
    await page.goto("/console/health")
    assert page.url.endswith("/console/login")
    await shot(page, "login")
    await page.fill("#token", "not-the-token")
    await page.keyboard.press("Enter")
    await expect(page.locator("#login-error")).to_contain_text("not valid")
    await page.locator("#token").focus()
    await page.keyboard.type(console_hub.test_admin_token)
    await page.keyboard.press("Enter")
    await expect(page.locator("h1")).to_have_text("Start")
    await expect(page.locator('[data-check="health"] .check-state')).not_to_have_text("checking...")
    await shot(page, "start")


def _qr_rows(link: str) -> list[str]:
    """The pairing link's QR code (as the hub encodes it), quiet zone included."""
    code = segno.make(link, error="m", mask=0, micro=False, boost_error=False)
    return ["".join("1" if v else "0" for v in row) for row in code.matrix_iter(border=QR_BORDER)]


async def _rendered_qr(page: Page) -> list[str]:
    """The #pair-qr image drawn on a canvas, each module's centre dark (1) or light."""
    return await page.evaluate(
        """async (scale) => {
            const img = document.getElementById("pair-qr");
            await img.decode();
            const canvas = document.createElement("canvas");
            canvas.width = img.naturalWidth;
            canvas.height = img.naturalHeight;
            const ctx = canvas.getContext("2d");
            ctx.drawImage(img, 0, 0);
            const data = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
            const rows = [];
            for (let y = 0; y < canvas.height / scale; y++) {
                let row = "";
                for (let x = 0; x < canvas.width / scale; x++) {
                    const at = ((y * scale + scale / 2) * canvas.width + x * scale + scale / 2) * 4;
                    row += data[at] < 128 ? "1" : "0";
                }
                rows.push(row);
            }
            return rows;
        }""",
        QR_SCALE,
    )


async def test_pair_a_desktop_end_to_end_then_revoke_it(page, console_hub, tmp_path):
    await page.goto(f"/console/desktops?tenant={TENANT}")
    await page.fill("#pair-label", "laptop from the console")
    await page.click("#pair-form button[type=submit]")
    await expect(page.locator("#pair-result")).to_be_visible()
    code = (await page.text_content("#pair-code")) or ""
    command = (await page.text_content("#pair-command")) or ""
    assert command.startswith(f"cowork desktop pair {code} --hub nats://")
    qr = await page.get_attribute("#pair-qr", "src")
    assert qr and qr.startswith("data:image/svg+xml")
    link_command = (await page.text_content("#pair-link-command")) or ""
    link = link_command.split("'")[1]
    assert f"code={code}" in link
    # The QR code as Chromium draws it, read back a module at a time: the link's code.
    assert await _rendered_qr(page) == _qr_rows(link)
    await shot(page, "desktops-pairing")
    # The link, as the console shows it, redeemed by the real command.
    state = tmp_path / "desktop"
    status, out, err = await cowork("desktop", "pair", link, "--state-dir", str(state))
    assert status == 0, err
    pairing_id = out.split("Paired as ")[1].split()[0]
    # The same code works once only.
    again, _, err = await cowork("desktop", "pair", link, "--state-dir", str(tmp_path / "d2"))
    assert again != 0 and "pairing failed" in err
    desktop = await start_desktop(state, "http://127.0.0.1:9", heartbeat=0.5)
    try:
        await expect(page.locator("#pair-status")).to_have_text("online", timeout=15_000)
        row = page.locator(f'#pairings-table tr[data-key="{pairing_id}"]')
        await expect(row).to_contain_text("paired_online", timeout=10_000)
        await shot(page, "desktops-online")
        await _watch_a_hostile_event(page, console_hub, pairing_id)
        # edit its allowlist and policy from the console
        await page.fill("#edit-id", pairing_id)
        await page.fill("#edit-workspaces", "local, projects")
        await page.select_option("#edit-prompts", "false")
        await page.click("#edit-form button[type=submit]")
        await expect(row).to_contain_text("projects", timeout=10_000)
        await expect(row).to_contain_text('"allowRemotePrompts":false')
        await row.get_by_role("button", name=f"Revoke {pairing_id}").click()
        await expect(row).to_contain_text("revoked", timeout=10_000)
        await expect(page.locator("#pair-status")).to_have_text("revoked", timeout=10_000)
    finally:
        await desktop.stop()


async def test_register_a_gateway_and_watch_its_first_heartbeat(page, console_hub, tmp_path):
    await page.goto(f"/console/gateways?tenant={TENANT}")
    await page.fill("#gw-name", "rack gateway")
    await page.select_option("#gw-kind", "edge_worker")
    await page.click("#gateway-form button[type=submit]")
    await expect(page.locator("#gateway-result")).to_be_visible()
    credential = (await page.text_content("#gw-credential")) or ""
    commands = ((await page.text_content("#gw-commands")) or "").splitlines()
    register = commands[1].split()
    assert register[:3] == ["cowork", "gateway", "register"]
    assert register[register.index("--hub") + 1] == console_hub.settings.edge_nats_urls[0]
    secret = tmp_path / "gateway.credential"
    secret.write_text(credential)
    state = tmp_path / "gateway"
    status, out, err = await cowork(
        *register[1 : register.index("--credential-file")],
        "--credential-file",
        str(secret),
        "--opencode",
        "http://127.0.0.1:9",
        "--state-dir",
        str(state),
    )
    assert status == 0, err
    await shot(page, "gateways-registered")
    gateway = await start_gateway(state, "http://127.0.0.1:9", heartbeat=0.5)
    try:
        await expect(page.locator("#gw-status")).to_contain_text(
            "first heartbeat at", timeout=15_000
        )
        registration = out.split("Registered ")[1].split()[0]
        row = page.locator(f'#gateways-table tr[data-key="{registration}"]')
        await expect(row).to_contain_text("rack gateway")
        online = row.locator("td").nth(3)
        await expect(online).to_have_text("yes", timeout=10_000)
        await shot(page, "gateways-heartbeat")
    finally:
        await gateway.stop()
    await expect(online).to_have_text("no", timeout=10_000)  # its last beat said stopping
    # (the agent stopped first: stopping it while it drains can take seconds)
    await row.get_by_role("button", name=f"Drain {registration}").click()
    await expect(row.locator(".state")).to_have_text("draining", timeout=10_000)
    await row.get_by_role("button", name=f"Resume {registration}").click()
    # back in service (or unhealthy, as it last said: no OpenCode answers at its address)
    await expect(row.locator(".state")).to_have_text(
        re.compile(r"^(active|unhealthy)$"), timeout=10_000
    )
    await row.get_by_role("button", name=f"Rotate {registration}").click()
    output = page.locator("#action-output")
    await expect(output).to_contain_text('"credentialVersion": 2', timeout=10_000)
    assert credential.strip() not in ((await output.text_content()) or "")  # a new one
    await row.get_by_role("button", name=f"Revoke {registration}").click()
    await expect(row.locator(".state")).to_have_text("revoked", timeout=10_000)
    # edge work: the queue, its state and attempts; a work item's details
    async with client(console_hub, admin=True) as http:
        work = await http.post(
            f"/api/v1/tenants/{TENANT}/work",
            json={"kind": "prompt", "sessionRef": {"workspaceId": "w1"}, "payload": {"text": "x"}},
        )
        assert work.status_code == 201, work.text
    work_id = work.json()["workId"]
    await page.goto(f"/console/work?tenant={TENANT}")
    work_row = page.locator(f'#work-table tr[data-key="{work_id}"]')
    await expect(work_row).to_contain_text("prompt", timeout=10_000)
    await work_row.get_by_role("button", name=f"Details {work_id}").click()
    await expect(page.locator("#action-output")).to_contain_text('"leases"')
    await work_row.get_by_role("button", name=f"Cancel {work_id}").click()
    await expect(work_row.locator(".state")).to_have_text("cancelled", timeout=10_000)
    await shot(page, "work")


async def _watch_a_hostile_event(page: Page, hub, pairing_id: str) -> None:
    """An event whose payload is markup, published as the Desktop would, shows in the
    live view (a second tab, over SSE) as text."""
    _, data = desktop_event(
        pairing_id, {"type": "text", "text": HOSTILE}, tenant=TENANT, workspace="local"
    )
    subject = subjects.DEVICE_EVENT.build(tenant=TENANT, device_id=pairing_id, event_kind="session")
    await hub.js.publish(subject, data)
    live = await page.context.new_page()
    try:
        await live.goto(f"/console/?tenant={TENANT}")  # the first-run checklist
        await expect(live.locator('[data-check="desktop"] .check-state')).to_have_text(
            "a Desktop is online", timeout=10_000
        )
        await live.goto(f"/console/events?tenant={TENANT}")
        await live.fill("#events-workspace", pairing_id)  # a Desktop's workspace: its pairing
        await live.click("#events-form button[type=submit]")
        # the payload as JSON text: the markup is there, as characters
        await expect(live.locator("#events-list")).to_contain_text(
            "<script>window.__xss=2</script>&amp;", timeout=15_000
        )
        await expect(live.locator("#events-list")).to_contain_text("<img src=x onerror=")
        assert await live.locator("#events-list img, #events-list script").count() == 0
        assert await live.evaluate("window.__xss") is None
        await shot(live, "events-live")
    finally:
        await live.close()


async def test_a_telegram_instance_shows_its_webhook_url_and_sends_a_test_message(
    page, console_hub
):
    telegram = FakeTelegram()  # the platform: Telegram's Bot API, as documented
    await telegram.start()
    try:
        await page.goto(f"/console/channels?tenant={TENANT}")
        await page.select_option("#ch-kind", "telegram")
        await page.fill("#ch-id", "tg-console")
        await page.fill("#ch-name", "Support bot")
        await page.select_option("#ch-authority", "cloud_worker")
        await page.fill("#ch-workspace", "support")
        await page.fill("#ch-settings-apiBase", telegram.base_url)
        await page.check("#ch-settings-allowLoopbackHttp")
        await page.fill("#ch-secrets-botToken", telegram.bot_token)
        await page.fill("#ch-secrets-webhookSecret", telegram.webhook_secret)
        await page.click("#channel-form button[type=submit]")
        await expect(page.locator("#status")).to_have_text("Done.")
        await expect(page.locator("#ch-webhook")).to_have_text(
            f"{console_hub.http_url}/webhooks/tg-console"
        )
        row = page.locator('#channels-table tr[data-key="tg-console"]')
        await expect(row).to_contain_text("telegram")
        await page.fill("#test-instance", "tg-console")
        await page.fill("#test-chat", "4242")
        await page.click("#test-form button[type=submit]")
        await expect(page.locator("#test-status")).to_have_text("sent", timeout=15_000)
        assert [p.text for p in telegram.chats["4242"]] == [
            "A test message from the cowork console."
        ]
        await page.select_option("#claim-role", "approver")
        await page.fill("#claim-instance", "tg-console")
        await page.click("#claim-form button[type=submit]")
        await expect(page.locator("#claim-code")).not_to_have_text("-", timeout=10_000)
        await console_hub.pool.execute(  # a chat user who wrote to the bot
            "INSERT INTO channel_users (tenant, instance_id, provider_user_id, display_name) "
            "VALUES ($1, 'tg-console', '777', $2)",
            TENANT,
            HOSTILE,
        )
        await page.fill("#users-instance", "tg-console")
        await page.click("#users-form button[type=submit]")
        user = page.locator('#users-table tr[data-key="777"]')
        await expect(user).to_contain_text(HOSTILE)
        await expect(user.locator(".state")).to_have_text("pending")
        await user.get_by_role("button", name="Make member 777").click()
        await expect(user.locator(".state")).to_have_text("member", timeout=10_000)
        assert await page.locator("#users-table img, #users-table script").count() == 0
        await shot(page, "channels")
        await page.goto(f"/console/?tenant={TENANT}")  # the first-run checklist
        await expect(page.locator('[data-check="gateway"] .check-state')).to_have_text(
            "registered, none online"
        )
        await expect(page.locator('[data-check="channel"] .check-state')).to_have_text("connected")
    finally:
        await telegram.stop()


async def test_the_health_center_shows_nats_offline_and_recovering(page, console_nats):
    await page.goto("/console/health")
    state = page.locator("#health-table tbody tr").filter(
        has=page.get_by_role("cell", name="nats", exact=True)
    )
    await expect(state.first).to_contain_text("ready", timeout=10_000)
    await shot(page, "health")
    await console_nats.stop()
    try:
        await expect(state.first).to_contain_text("offline", timeout=15_000)
        await expect(page.locator("#overall")).to_have_text("offline")
        await shot(page, "health-nats-offline")
    finally:
        await console_nats.start()
    await expect(state.first).to_contain_text("ready", timeout=20_000)
    await expect(page.locator("#overall")).not_to_have_text("offline", timeout=20_000)


async def _dead_letter(hub, action: str, reason: str) -> None:
    record = AuditRecord(action=action, actor_kind="hub", actor_id="hub")
    envelope = Envelope.wrap(
        record, source=Source(principal_kind=PrincipalKind.HUB, principal_id="hub"), tenant=TENANT
    )
    await hub.dead_letters.put(
        tenant=TENANT,
        family=subjects.AUDIT,
        subject=subjects.AUDIT.build(tenant=TENANT, principal_kind="hub", principal_id="hub"),
        payload=envelope.encode(),
        code="test.set_aside",
        reason=reason,
    )


async def test_replay_a_dead_letter_from_the_console(page, console_hub):
    await _dead_letter(console_hub, "console.browser_replayed", "set aside " + HOSTILE)
    await page.goto(f"/console/dead-letters?tenant={TENANT}")
    row = page.locator("#deadletters-table tbody tr").filter(has_text="browser_replayed")
    await expect(row).to_contain_text(HOSTILE)  # the reason, as text
    await shot(page, "dead-letters")
    await row.get_by_role("button", name="Replay").click()
    await expect(row).to_have_count(0, timeout=10_000)
    await page.goto(f"/console/audit?tenant={TENANT}")
    await page.fill("#audit-action", "console.browser_replayed")
    await page.keyboard.press("Enter")
    await expect(page.locator("#audit-table tbody tr")).to_have_count(1, timeout=15_000)
    await expect(page.locator("#audit-table tbody")).to_contain_text(
        "console.browser_replayed", timeout=15_000
    )
    await shot(page, "audit")


async def test_hostile_names_and_payloads_are_shown_as_text(page, console_hub):
    async with client(console_hub, admin=True) as http:
        made = await http.post(f"/api/v1/tenants/{TENANT}/pairings", json={"label": HOSTILE})
        assert made.status_code == 201
    await page.goto(f"/console/desktops?tenant={TENANT}")
    await expect(page.locator("#pairings-table tbody")).to_contain_text(HOSTILE)
    assert await page.locator("#pairings-table img, #pairings-table script").count() == 0
    await page.goto(f"/console/dead-letters?tenant={TENANT}")
    await _dead_letter(console_hub, "console.hostile", HOSTILE)
    await page.reload()
    await expect(page.locator("#deadletters-table tbody")).to_contain_text(HOSTILE)
    letter = page.locator("#deadletters-table tbody tr").filter(has_text="console.hostile")
    await expect(letter.locator("pre")).to_contain_text('"action":"console.hostile"')  # the message
    await letter.get_by_role("button", name="Discard").click()  # and it is gone for good
    await expect(letter).to_have_count(0, timeout=10_000)
    assert await page.evaluate("window.__xss") is None
    assert page.dialogs == []  # type: ignore[attr-defined]
    # a tenant parameter full of markup is not reflected as markup either
    await page.goto("/console/desktops?tenant=%3Cscript%3Ewindow.__xss%3D3%3C%2Fscript%3E")
    assert await page.evaluate("window.__xss") is None


async def test_a_long_list_is_shown_a_page_at_a_time(page, console_hub):
    """A list longer than a page (the API's 100 by default) shows one page and a
    pager; Next page shows the rest, First page comes back, and the page shown
    stays across the table's refreshes."""
    async with client(console_hub, admin=True) as http:
        for i in range(101):
            made = await http.post(f"/api/v1/tenants/{TENANT}/pairings", json={"label": f"p{i}"})
            assert made.status_code == 201, made.text
        listed = await http.get(f"/api/v1/tenants/{TENANT}/pairings", params={"limit": 1000})
        total = len(listed.json()["items"])
    assert total > 100
    await page.goto(f"/console/desktops?tenant={TENANT}")
    rows = page.locator("#pairings-table tbody tr")
    pager = page.locator("#pairings-table-pager")
    await expect(rows).to_have_count(100)
    await expect(pager).to_be_visible()
    await expect(pager.get_by_role("button", name="First page")).to_be_disabled()
    await pager.get_by_role("button", name="Next page").click()
    await expect(rows).to_have_count(total - 100)
    await expect(pager.get_by_role("button", name="Next page")).to_be_disabled()
    await page.wait_for_timeout(2500)  # a refresh (every 2 s) keeps the page shown
    await expect(rows).to_have_count(total - 100)
    await pager.get_by_role("button", name="First page").click()
    await expect(rows).to_have_count(100)
    await expect(page.locator("#pairings-table tbody")).to_contain_text("p100")


async def test_the_fleet_lists_are_filtered_by_status_online_and_label(page, console_hub):
    """The Desktops' and Gateways' tables take the API's filters from a form: a
    status (the API's own choices), online or not, and a part of the name; a new
    filter starts from the first page."""
    tag = f"t{time.time_ns() % 10**9}"  # this test's own rows, among the module's
    async with client(console_hub, admin=True) as http:
        for name in ("north dock", "south dock", "north gate"):
            made = await http.post(
                f"/api/v1/tenants/{TENANT}/pairings", json={"label": f"{tag} {name}"}
            )
            assert made.status_code == 201, made.text
        made = await http.post(
            f"/api/v1/tenants/{TENANT}/gateway-registrations",
            json={
                "displayName": f"{tag} north rack",
                "kind": "edge_worker",
                "trustModel": "self_hosted_same_operator",
            },
        )
        assert made.status_code == 201, made.text
    await page.goto(f"/console/desktops?tenant={TENANT}")
    rows = page.locator("#pairings-table tbody tr")
    await expect(rows.first).to_be_visible()
    form = page.locator("#pairings-table-filter")
    options = await form.locator("select[name=status] option").evaluate_all(
        "(os) => os.map((o) => o.value).filter(Boolean)"
    )
    assert tuple(options) == PAIRING_STATUSES
    await form.get_by_label("Label contains").fill(f"{tag} NORTH")
    await form.get_by_role("button", name="Filter").click()
    await expect(rows).to_have_count(2)
    await expect(page.locator("#pairings-table tbody")).to_contain_text("north gate")
    await form.get_by_label("Status").select_option("revoked")
    await form.get_by_role("button", name="Filter").click()
    await expect(rows).to_have_text(["Nothing matches the filters."])
    await form.get_by_label("Status").select_option("pending")
    await form.get_by_label("Online").select_option("false")
    await form.get_by_role("button", name="Filter").click()
    await expect(rows).to_have_count(2)

    await page.goto(f"/console/gateways?tenant={TENANT}")
    form = page.locator("#gateways-table-filter")
    options = await form.locator("select[name=status] option").evaluate_all(
        "(os) => os.map((o) => o.value).filter(Boolean)"
    )
    assert tuple(options) == REGISTRATION_STATUSES
    await form.get_by_label("Name contains").fill(f"{tag} north rack")
    await form.get_by_label("Online").select_option("false")
    await form.get_by_role("button", name="Filter").click()
    gateways = page.locator("#gateways-table tbody tr")
    await expect(gateways).to_have_count(1)
    await expect(gateways.first.locator("td").nth(3)).to_have_text("no")  # Online
    await form.get_by_label("Online").select_option("true")
    await form.get_by_role("button", name="Filter").click()
    await expect(gateways).to_have_text(["Nothing matches the filters."])


async def test_a_change_without_the_csrf_token_is_refused(page):
    await page.goto(f"/console/desktops?tenant={TENANT}")
    status = await page.evaluate(
        """async () => (await fetch('/api/v1/tenants/default/pairings', {method: 'POST',
            headers: {'Content-Type': 'application/json'},
            body: JSON.stringify({label: 'no token'})})).status"""
    )
    assert status == 403


async def test_a_viewer_session_cannot_change_anything(browser, console_hub):
    context = await browser.new_context(viewport=PHONE, base_url=console_hub.http_url)
    viewer = await context.new_page()
    try:
        await viewer.goto("/console/login")
        await viewer.fill("#token", VIEWER)
        await viewer.keyboard.press("Enter")
        await expect(viewer.locator(".role")).to_have_text("viewer")
        await viewer.goto(f"/console/desktops?tenant={TENANT}")
        assert await viewer.locator("#pair-form").count() == 0
        await expect(viewer.locator("#pairings-table tbody tr").first).to_be_visible()
        assert await viewer.get_by_role("button", name="Revoke").count() == 0
        csrf = await viewer.get_attribute('meta[name="csrf-token"]', "content")
        status = await viewer.evaluate(
            """async (csrf) => (await fetch('/api/v1/tenants/default/pairings', {method: 'POST',
                headers: {'Content-Type': 'application/json', 'X-CSRF-Token': csrf},
                body: JSON.stringify({label: 'viewer'})})).status""",
            csrf,
        )
        assert status == 403
        await shot(viewer, "viewer-desktops")
    finally:
        await context.close()


PAGES = [
    "",
    "health",
    "desktops",
    "gateways",
    "channels",
    "work",
    "dead-letters",
    "audit",
    "events",
]


async def test_every_page_is_keyboard_usable_with_labelled_controls(page):
    for path in PAGES:
        await page.goto(f"/console/{path}?tenant={TENANT}")
        await page.wait_for_load_state("networkidle")
        unlabelled = await page.evaluate(
            """() => Array.from(document.querySelectorAll('input:not([type=hidden]), select, textarea'))
                .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label'))
                .map(el => el.id || el.name)"""
        )
        assert unlabelled == [], (path, unlabelled)
        buttons = await page.evaluate(
            """() => Array.from(document.querySelectorAll('button'))
                .filter(b => !(b.textContent.trim() || b.getAttribute('aria-label'))).length"""
        )
        assert buttons == 0, path
        # the skip link comes first, and Tab reaches the page's navigation
        await page.keyboard.press("Tab")
        assert await page.evaluate("document.activeElement.className") == "skip"
        reached = set()
        for _ in range(25):
            await page.keyboard.press("Tab")
            reached.add(await page.evaluate("document.activeElement.closest('nav') !== null"))
        assert True in reached, path
        await shot(page, f"page-{path or 'start'}")
    # sign out, and the session is gone
    await page.get_by_role("button", name="Sign out").click()
    await expect(page).to_have_url(page.url.split("/console")[0] + "/console/login")
    await page.goto("/console/health")
    assert page.url.endswith("/console/login")
    # where a pairing link lands (no session needed): the command, from the fragment, as text
    await page.goto("/console/pair#code=AB12-CD34&hub=nats%3A%2F%2Fhub.example%3A4222")
    await expect(page.locator("#pair-command")).to_contain_text(
        "cowork desktop pair AB12-CD34 --hub nats://hub.example:4222"
    )
    await shot(page, "pair-link")
