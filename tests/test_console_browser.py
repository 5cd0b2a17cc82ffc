"""The console in a real browser (issue 11.3): headless Chromium (Debian's `chromium`, driven by
Playwright without a browser download of its own) against a whole sidecar: log in, see the balance,
make calls with the OpenAI SDK and see them appear, create and revoke an API key, add, deactivate and
reactivate a BYOK key, log out, and be refused by a token scoped to another workspace; buy credits
through the local fake Stripe's checkout and download the invoice.

Each page is photographed into SIDECAR_SCREENSHOTS_DIR (default: artifacts/console/, see README);
docs/console/ keeps a committed set."""

from __future__ import annotations

import asyncio
import io
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest
import pytest_asyncio
from pypdf import PdfReader
from support.harness import ADMIN_TOKEN, SCOPED_ADMIN_TOKEN, SCOPED_WORKSPACE, Sidecar
from support.payments import Shop

from sidecar.money import format_micro

CHROMIUM = os.environ.get("SIDECAR_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FOUND = os.path.exists(CHROMIUM)
ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = Path(os.environ.get("SIDECAR_SCREENSHOTS_DIR", ROOT / "artifacts" / "console"))
VIEWPORT = {"width": 1366, "height": 860}  # a laptop screen
CUSTOMER_KEY = "sk-customer-browser-key-5678"


@pytest_asyncio.fixture
async def browser() -> AsyncIterator[object]:
    if not CHROMIUM_FOUND:
        pytest.fail(
            f"no Chromium at {CHROMIUM}: install Debian's chromium and chromium-driver "
            "(apt-get install -y chromium chromium-driver; .ci/run does) or set SIDECAR_CHROMIUM"
        )
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        launched = await pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield launched
        finally:
            await launched.close()


async def _page(browser):
    context = await browser.new_context(viewport=VIEWPORT)
    page = await context.new_page()
    page.on("dialog", lambda dialog: dialog.accept())  # the revoke confirmation
    return page


async def shot(page, name: str) -> None:
    os.makedirs(SCREENSHOTS, exist_ok=True)
    await page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


async def log_in(page, sidecar: Sidecar, token: str) -> None:
    await page.goto(str(sidecar.control.make_url("/console")))
    assert page.url.endswith("/console/login")
    await page.fill("#token", token)
    await page.click("button[type=submit]")


async def reload_until(page, read, wanted):
    """What `read()` gives once `wanted` holds, reloading meanwhile. History shows a row once every
    transaction older than its own has ended (statements/history.py): on a shared Postgres another
    session's open transaction can hold the newest rows back a moment."""
    for _ in range(50):
        if wanted(found := await read()):
            return found
        await asyncio.sleep(0.1)
        await page.reload()
    return await read()


def _sdk(sidecar: Sidecar, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=sidecar.base_url, api_key=key, max_retries=0)


async def _text(page, selector: str) -> str:
    return (await page.inner_text(selector)).strip()


async def test_an_operator_sees_the_balance_calls_and_manages_keys(sidecar: Sidecar, browser) -> None:
    ws = await sidecar.workspace(credits_micro=25_000_000)
    page = await _page(browser)
    await page.goto(str(sidecar.control.make_url("/console")))
    await shot(page, "01-login")
    await log_in(page, sidecar, ADMIN_TOKEN)
    assert page.url.endswith("/console/workspaces")
    await shot(page, "02-workspaces")
    await page.click(f"a[href='/console/w/{ws.id}']")
    assert await _text(page, "[data-test=balance]") == "25.000000"
    assert await _text(page, "[data-test=auto-reload]") == "off"
    assert "No call yet" in await _text(page, ".calls")

    # Calls made with the SDK appear on the overview, and the balance reflects them.
    client = _sdk(sidecar, ws.key)
    for question in ("What is metering?", "And a hold?", "Why integers?"):
        await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": question}])
    rows = await sidecar.ledger_eventually(ws.id, 3)
    assert len(rows) == 3
    listed = await reload_until(page, page.locator(".calls tbody tr").all_inner_texts, lambda rows: len(rows) == 3)
    assert len(listed) == 3 and all("gpt-4o-mini" in r and "completed" in r for r in listed)
    balance_micro, _ = await sidecar.redis_account(ws.id)
    assert balance_micro == 25_000_000 - sum(r["cost_micro"] for r in rows) < 25_000_000
    assert await _text(page, "[data-test=balance]") == format_micro(balance_micro)
    assert await _text(page, "[data-test=held]") == "0.000000"
    assert await _text(page, "[data-test=calls-30d]") == "3"
    assert await _text(page, "[data-test=spent-30d]") == format_micro(25_000_000 - balance_micro)
    assert await page.locator("svg.chart rect.bar").count() == 7
    assert "gpt-4o-mini" in await _text(page, ".models")
    await shot(page, "03-overview")

    # The ledger: every entry, filtered, and the same entries as a CSV statement.
    await page.click("nav >> text=Ledger")
    assert len(await page.locator(".ledger tbody tr").all_inner_texts()) == 4  # the grant and 3 calls
    await page.select_option("select[name=kind]", "usage")
    await page.click("form.filters button")
    await page.wait_for_url("**kind=usage**")
    usage_rows = await page.locator(".ledger tbody tr").all_inner_texts()
    assert len(usage_rows) == 3 and all("usage" in r for r in usage_rows)
    await shot(page, "04-ledger")
    async with page.expect_download() as info:
        await page.click("[data-test=csv]")
    download = await info.value
    assert download.suggested_filename == f"ledger-{ws.id}.csv"
    statement = await asyncio.to_thread(Path(await download.path()).read_text)
    header, *lines = statement.strip().splitlines()
    assert header.startswith("event_id,created_at,kind") and len(lines) == 3
    assert {str(r["event_id"]) for r in rows} == {line.split(",")[0] for line in lines}

    # API keys: created and shown once, with a copy button; listed by last 4; revoked.
    await page.click("nav >> text=API keys")
    await page.fill("input[name=name]", "browser-agent")
    await page.click("text=Create key")
    new_key = await page.input_value("[data-test=new-key]")
    assert new_key.startswith("sk-sc-")
    await page.click("button.copy")
    await page.wait_for_selector("button.copy:has-text('Copied')")
    await shot(page, "05-api-key-created")
    answer = await _sdk(sidecar, new_key).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
    )
    assert answer.choices[0].message.content
    await page.goto(page.url)  # the keys page again: the key is never shown twice
    assert new_key not in await page.content()
    row = page.locator("tr", has_text="browser-agent")
    assert f"…{new_key[-4:]}" in await row.inner_text()
    await row.locator("button", has_text="Revoke").click()
    await page.wait_for_selector(".notice")
    assert "revoked" in await page.locator("tr", has_text="browser-agent").inner_text()
    await page.select_option("select[name=key_id]", ws.key_id)
    await page.fill("input[name=budget]", "5.00")
    await page.click("text=Set budget")
    assert "budget was saved" in await _text(page, ".notice")
    assert "of 5.000000 left (monthly)" in await page.locator("tr", has_text=f"…{ws.key[-4:]}").inner_text()
    await shot(page, "06-api-keys")

    # BYOK: added (validated with the provider), shown by its last 4, used, deactivated, reactivated.
    await page.click("nav >> text=BYOK keys")
    await page.select_option("select[name=provider]", "mock")
    await page.fill("input[name=key]", CUSTOMER_KEY)
    await page.click("text=Validate and add")
    assert "validated and stored" in await _text(page, ".notice")
    byok_row = page.locator("tbody tr", has_text="5678")
    assert "active" in await byok_row.inner_text()
    assert CUSTOMER_KEY not in await page.content()
    await shot(page, "07-byok-keys")
    await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "byok"}])
    assert sidecar.recorded[-1].headers["authorization"] == f"Bearer {CUSTOMER_KEY}"
    rows = await sidecar.ledger_eventually(ws.id, 5)
    assert rows[-1]["byok"] is True
    await byok_row.locator("button", has_text="Deactivate").click()
    assert "deactivated" in await _text(page, ".notice")
    assert "inactive" in await page.locator("tbody tr", has_text="5678").inner_text()
    await page.locator("tbody tr", has_text="5678").locator("button", has_text="Reactivate").click()
    assert "reactivated" in await _text(page, ".notice")
    await page.click(f"a[href='/console/w/{ws.id}']")
    await reload_until(page, lambda: page.locator(".calls tbody tr").first.inner_text(), lambda t: "BYOK" in t)
    assert await _text(page, "[data-test=byok-30d]") == "1"

    # A provider key the provider refuses is not stored, and the page says why.
    await page.click("nav >> text=BYOK keys")
    await page.fill("input[name=key]", "short")
    await page.click("text=Validate and add")
    assert "must be the provider's API key" in await _text(page, ".notice.error")
    await shot(page, "08-byok-refused")

    await page.click("text=Log out")
    assert page.url.endswith("/console/login")
    await page.goto(str(sidecar.control.make_url(f"/console/w/{ws.id}")))
    assert page.url.endswith("/console/login")  # the session is gone


async def test_a_token_scoped_to_another_workspace_is_refused(sidecar: Sidecar, browser) -> None:
    other = await sidecar.workspace(credits_micro=1_000_000)
    await sidecar.admin("POST", "/workspaces", {"id": SCOPED_WORKSPACE, "name": "Scoped Inc."})
    page = await _page(browser)
    await log_in(page, sidecar, SCOPED_ADMIN_TOKEN)
    assert page.url.endswith(f"/console/w/{SCOPED_WORKSPACE}")
    assert await page.locator("a.switch").count() == 0  # no way to other workspaces
    for path in (f"/console/w/{other.id}", f"/console/w/{other.id}/keys", "/console/workspaces"):
        response = await page.goto(str(sidecar.control.make_url(path)))
        assert response.status == 403
        assert "Not allowed" in await _text(page, "h1")
        assert other.id not in await page.inner_text("main")
    await shot(page, "09-refused-other-workspace")

    # A form whose CSRF token was tampered with is refused, and changes nothing.
    await page.goto(str(sidecar.control.make_url(f"/console/w/{SCOPED_WORKSPACE}/keys")))
    await page.eval_on_selector("form.row input[name=csrf]", "field => field.value = 'forged'")
    await page.fill("input[name=name]", "forged")
    await page.click("text=Create key")
    assert "security token" in await page.inner_text("main")
    _, keys = await sidecar.admin("GET", f"/workspaces/{SCOPED_WORKSPACE}/keys")
    assert not [k for k in keys["data"] if k["name"] == "forged"]
    await shot(page, "10-refused-bad-csrf")
    assert re.search(r"403", await page.inner_text(".status"))


async def test_a_customer_buys_credits_through_checkout_and_gets_the_invoice(shop: Shop, browser) -> None:
    sidecar = shop.sidecar
    ws = await sidecar.workspace(credits_micro=1_000_000)
    profile = {"legal_name": "Kunde GmbH", "address": "Weg 1\n80331 Muenchen", "country": "DE"}
    status, _ = await sidecar.admin("PUT", f"/workspaces/{ws.id}/billing-profile", profile)
    assert status == 200
    shop.fake.auto_deliver = True  # Pay sends the signed webhooks, as Stripe would
    page = await _page(browser)
    # After paying, Checkout sends the customer to the configured success_url (the shop's own site).
    await page.route(
        "http://localhost:3000/**", lambda route: route.fulfill(body="<p>Thank you</p>", content_type="text/html")
    )
    await log_in(page, sidecar, ADMIN_TOKEN)
    await page.goto(str(sidecar.control.make_url(f"/console/w/{ws.id}")))
    await page.click("nav >> text=Credits")
    assert await _text(page, "[data-test=balance]") == "1.000000"
    assert "No order yet" in await _text(page, ".orders")

    # The amount, then every figure before paying: 10.00 + 5% fee (0.50) + 19% DE tax on 10.50 (2.00 rounded).
    await page.fill("input[name=amount]", "10.00")
    await page.click("text=Review purchase")
    confirm = await _text(page, ".confirm")
    for line in ("Purchase fee (5%)\t0.50", "tax 19% (DE)\t2.00", "10.00"):
        assert line in confirm, confirm
    currency = sidecar.svc.payments.currency.upper()
    assert await _text(page, "[data-test=total]") == f"12.50 {currency}"
    await shot(page, "11-credits-confirm")
    assert await shop.balance(ws.id) == 1_000_000  # nothing bought yet

    # Confirm: the order is created and the browser lands on the provider's checkout page.
    await page.click("[data-test=confirm]")
    await page.wait_for_url(re.compile(r".*/pay/cs_.*"))
    assert "Fake Stripe Checkout" in await page.content()
    assert f"1250 {currency}" in await page.inner_text("body")
    await page.click("text=Pay")
    await page.wait_for_url("http://localhost:3000/**")
    for _ in range(100):  # the signed webhook credits the workspace
        if await shop.balance(ws.id) == 11_000_000:
            break
        await asyncio.sleep(0.05)
    assert await shop.balance(ws.id) == 11_000_000

    # Back in the console: the new balance, the paid order and its invoice.
    await page.goto(str(sidecar.control.make_url(f"/console/w/{ws.id}/credits")))
    assert await _text(page, "[data-test=balance]") == "11.000000"
    order_row = await _text(page, ".orders tbody tr")
    assert "credited" in order_row and "10.000000" in order_row and f"12.50 {currency}" in order_row
    assert len(await page.locator(".invoices tbody tr").all_inner_texts()) == 1
    await shot(page, "12-credits")
    async with page.expect_download() as info:
        await page.click("[data-test=invoice-pdf]")
    download = await info.value
    assert download.suggested_filename.endswith(".pdf")
    body = await asyncio.to_thread(Path(await download.path()).read_bytes)
    assert body.startswith(b"%PDF")
    text = "\n".join(p.extract_text() for p in PdfReader(io.BytesIO(body)).pages)
    assert "12.50" in text and "Kunde GmbH" in text

    # The ledger CSV has the top-up.
    await page.click("nav >> text=Ledger")
    async with page.expect_download() as info:
        await page.click("[data-test=csv]")
    statement = await asyncio.to_thread(Path(await (await info.value).path()).read_text)
    topups = [line for line in statement.splitlines() if ",topup," in line]
    assert len(topups) == 1 and "10.000000" in topups[0], statement

    # Auto-reload: saved from the form (the paid checkout saved the payment method).
    await page.click("nav >> text=Credits")
    await page.fill(".auto-reload input[name=threshold]", "2.00")
    await page.fill(".auto-reload input[name=amount]", "20.00")
    await page.check(".auto-reload input[name=enabled]")
    await page.click("text=Save auto-reload")
    assert "auto-reload settings were saved" in await _text(page, ".notice")
    _, settings = await sidecar.admin("GET", f"/workspaces/{ws.id}/auto-reload")
    assert settings["enabled"] and settings["threshold_micro"] == 2_000_000 and settings["amount_micro"] == 20_000_000
    await page.fill(".auto-reload input[name=amount]", "1.00")  # below the threshold: refused, unchanged
    await page.click("text=Save auto-reload")
    assert "at least the threshold" in await _text(page, ".notice.error")
    _, again = await sidecar.admin("GET", f"/workspaces/{ws.id}/auto-reload")
    assert again["amount_micro"] == 20_000_000
    await page.goto(str(sidecar.control.make_url(f"/console/w/{ws.id}")))  # the overview says it is on
    assert await _text(page, "[data-test=auto-reload]") == "on"
    assert "buys 20.000000 below 2.000000" in await _text(page, ".stat:has([data-test=auto-reload])")
