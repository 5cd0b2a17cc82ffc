"""A small local fake of the Stripe endpoints the sidecar uses, for tests, `sidecar dev` and the console.

The official `stripe` SDK talks to it unchanged (point `payments.stripe.api_base` at it). It speaks
Stripe's wire format for what the sidecar calls:
- `POST /v1/checkout/sessions` (mode=payment, one line item with price_data, metadata,
  payment_intent_data.metadata, customer, success_url/cancel_url): an open session with a `url` on this
  server (`GET /pay/{id}`, a page with a Pay button, for a top-up flow without network).
- `GET /v1/checkout/sessions/{id}`, `POST /v1/checkout/sessions/{id}/expire` (an open one only; sends
  checkout.session.expired).
- `POST /v1/payment_intents` (amount, currency, customer, payment_method, confirm, off_session,
  metadata): confirmed at once; a payment method whose id contains "declined" fails as Stripe's
  card_declined (402) and sends payment_intent.payment_failed.
- `POST /v1/refunds` (payment_intent): a full refund; sends charge.refunded.
Every POST honours `Idempotency-Key` as Stripe does: the same key with the same parameters replays the
first answer; with other parameters it is refused (400 idempotency_error). `Authorization: Bearer <key>`
must be the configured secret key (401 otherwise).

Webhooks are signed exactly as Stripe signs them: `Stripe-Signature: t=<unix ts>,v1=<hex HMAC-SHA256 of
"<t>.<raw body>" keyed by the endpoint secret>`, and delivered to `webhook_url` with retries on a non-2xx
answer (bounded; Stripe retries for days, the fake `delivery_attempts_max` times). Tests drive it from
Python (`FakeStripe.complete_session`, `.event`, `.sign`, `.deliver`) or over HTTP (`POST /_fake/...`).

Run it alone: `python -m sidecar.devtools.fake_stripe --port 12111 --webhook-url URL` (secrets from
STRIPE_SECRET_KEY / STRIPE_WEBHOOK_SECRET, or the dev defaults below).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import html
import itertools
import os
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import aiohttp
import orjson
from aiohttp import web

DEV_SECRET_KEY = "sk_test_fake_dev_key"  # the fake's own, for `sidecar dev`
DEV_WEBHOOK_SECRET = "whsec_fake_dev_secret"
PORT_DEFAULT = 12111
API_VERSION = "2025-01-27.acacia"
DELIVERY_ATTEMPTS_MAX = 5
IDEMPOTENCY_KEYS_MAX = 100_000  # a bound on what the fake remembers
FAKE = web.AppKey("fake_stripe", object)
PARAMS = web.RequestKey("stripe_params", dict)


def decode_form(body: str) -> dict[str, Any]:
    """Stripe's form encoding (`a[b][0][c]=v`) into nested dicts and lists."""
    root: dict[str, Any] = {}
    for key, value in parse_qsl(body, keep_blank_values=True):
        *parents, leaf = re.findall(r"[^\[\]]+", key)
        node = root
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return _lists(root)


def _lists(node: Any) -> Any:
    """Dicts whose keys are 0..n-1 become lists (line_items[0][...])."""
    if not isinstance(node, dict):
        return node
    fixed = {k: _lists(v) for k, v in node.items()}
    if fixed and all(k.isdigit() for k in fixed) and sorted(map(int, fixed)) == list(range(len(fixed))):
        return [fixed[str(i)] for i in range(len(fixed))]
    return fixed


def sign(payload: bytes, secret: str, timestamp: int | None = None) -> str:
    """The Stripe-Signature header of `payload`, as Stripe computes it."""
    ts = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{ts}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={ts},v1={mac}"


@dataclass
class Delivery:
    event_id: str
    status: int
    attempts: int


@dataclass
class FakeStripe:
    secret_key: str = DEV_SECRET_KEY
    webhook_secret: str = DEV_WEBHOOK_SECRET
    webhook_url: str | None = None
    public_url: str = f"http://127.0.0.1:{PORT_DEFAULT}"  # where the checkout pages are; set once bound
    retry_delay_s: float = 0.2
    delivery_attempts_max: int = DELIVERY_ATTEMPTS_MAX
    auto_deliver: bool = True  # send the events of a completed/expired session, a PaymentIntent, a refund
    # Tests: the customer pays, and the webhooks are delivered, before the create call is even answered.
    pay_before_answering: bool = False
    sessions: dict[str, dict] = field(default_factory=dict)
    payment_intents: dict[str, dict] = field(default_factory=dict)
    events: list[dict] = field(default_factory=list)
    deliveries: list[Delivery] = field(default_factory=list)
    requests: list[tuple[str, str, dict]] = field(default_factory=list)  # (method, path, params)
    _idempotency: dict[str, tuple[bytes, int, bytes]] = field(default_factory=dict)
    _counter: itertools.count = field(default_factory=lambda: itertools.count(1))
    _tasks: set[asyncio.Task] = field(default_factory=set)
    _http: aiohttp.ClientSession | None = None

    # --- ids and objects --------------------------------------------------------------------------

    def _id(self, prefix: str) -> str:
        return f"{prefix}_fake{next(self._counter):06d}{secrets.token_hex(4)}"

    def event(self, event_type: str, obj: dict, created: int | None = None) -> dict:
        """A Stripe event around a snapshot of `obj` (recorded; not delivered)."""
        evt = {
            "id": self._id("evt"),
            "object": "event",
            "api_version": API_VERSION,
            "created": created or int(time.time()),
            "livemode": False,
            "pending_webhooks": 1,
            "request": {"id": None, "idempotency_key": None},
            "type": event_type,
            "data": {"object": orjson.loads(orjson.dumps(obj))},
        }
        self.events.append(evt)
        return evt

    def complete_session(self, session_id: str, amount_total: int | None = None, currency: str | None = None) -> list:
        """The customer paid: the session completes (amount and currency as charged; a test may make them
        differ from the session's), its PaymentIntent succeeds. Returns the two events, not yet delivered."""
        session = self.sessions[session_id]
        pi = self._payment_intent(
            amount_total if amount_total is not None else session["amount_total"],
            currency or session["currency"],
            session.get("customer") or self._id("cus"),
            self._id("pm"),
            (session.get("payment_intent_data") or {}).get("metadata") or dict(session["metadata"]),
        )
        session.update(
            status="complete",
            payment_status="paid",
            payment_intent=pi["id"],
            customer=pi["customer"],
            amount_total=pi["amount"],
            currency=pi["currency"],
        )
        public = {k: v for k, v in session.items() if k != "payment_intent_data"}
        return [self.event("checkout.session.completed", public), self.event("payment_intent.succeeded", pi)]

    def expire_session(self, session_id: str) -> dict:
        session = self.sessions[session_id]
        session.update(status="expired")
        return self.event("checkout.session.expired", {k: v for k, v in session.items() if k != "payment_intent_data"})

    def refund(self, payment_intent_id: str) -> dict:
        pi = self.payment_intents[payment_intent_id]
        charge = {
            "id": pi["latest_charge"],
            "object": "charge",
            "amount": pi["amount"],
            "amount_captured": pi["amount"],
            "amount_refunded": pi["amount"],
            "refunded": True,
            "currency": pi["currency"],
            "payment_intent": pi["id"],
            "customer": pi["customer"],
            "metadata": {},
            "status": "succeeded",
        }
        return self.event("charge.refunded", charge)

    def _payment_intent(self, amount: int, currency: str, customer: str, method: str, metadata: dict) -> dict:
        pi = {
            "id": self._id("pi"),
            "object": "payment_intent",
            "amount": amount,
            "amount_received": amount,
            "currency": currency,
            "customer": customer,
            "payment_method": method,
            "latest_charge": self._id("ch"),
            "metadata": metadata,
            "status": "succeeded",
            "created": int(time.time()),
        }
        self.payment_intents[pi["id"]] = pi
        return pi

    # --- webhooks ---------------------------------------------------------------------------------

    def sign(self, payload: bytes, timestamp: int | None = None, secret: str | None = None) -> str:
        return sign(payload, secret or self.webhook_secret, timestamp)

    async def deliver(self, evt: dict, url: str | None = None, timestamp: int | None = None) -> Delivery:
        """POST the event, signed, retrying a non-2xx answer (each attempt signed anew, as Stripe does)."""
        target = url or self.webhook_url
        assert target, "no webhook_url to deliver to"
        if self._http is None:
            self._http = aiohttp.ClientSession()
        body = orjson.dumps(evt)
        status, attempts = 0, 0
        for attempts in range(1, self.delivery_attempts_max + 1):  # noqa: B007 - the count is reported
            headers = {"Stripe-Signature": self.sign(body, timestamp), "Content-Type": "application/json"}
            try:
                async with self._http.post(target, data=body, headers=headers) as resp:
                    status = resp.status
            except aiohttp.ClientError:
                status = 0
            if 200 <= status < 300:
                break
            await asyncio.sleep(self.retry_delay_s)
        delivery = Delivery(evt["id"], status, attempts)
        self.deliveries.append(delivery)
        return delivery

    def _deliver_later(self, events: list[dict]) -> None:
        if not (self.auto_deliver and self.webhook_url):
            return

        async def run() -> None:
            for evt in events:
                await self.deliver(evt)

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._http is not None:
            await self._http.close()

    # --- the API ----------------------------------------------------------------------------------

    def create_session(self, params: dict) -> dict:
        item = params["line_items"][0]
        price = item["price_data"]
        amount = int(price["unit_amount"]) * int(item.get("quantity", 1))
        sid = self._id("cs_test")
        session = {
            "id": sid,
            "object": "checkout.session",
            "mode": params.get("mode", "payment"),
            "status": "open",
            "payment_status": "unpaid",
            "amount_total": amount,
            "currency": price["currency"],
            "client_reference_id": params.get("client_reference_id"),
            "customer": params.get("customer"),
            "metadata": params.get("metadata") or {},
            "payment_intent": None,
            "success_url": params.get("success_url"),
            "cancel_url": params.get("cancel_url"),
            "url": f"{self.public_url}/pay/{sid}",
            "expires_at": int(time.time()) + 86_400,
            "payment_intent_data": params.get("payment_intent_data") or {},
        }
        self.sessions[sid] = session
        return {k: v for k, v in session.items() if k != "payment_intent_data"}

    def create_payment_intent(self, params: dict) -> tuple[int, dict]:
        method = params.get("payment_method") or self._id("pm")
        pi = self._payment_intent(
            int(params["amount"]),
            params["currency"],
            params.get("customer") or "",
            method,
            params.get("metadata") or {},
        )
        if "declined" in method:
            pi.update(status="requires_payment_method", amount_received=0)
            self._deliver_later([self.event("payment_intent.payment_failed", pi)])
            error = {
                "type": "card_error",
                "code": "card_declined",
                "decline_code": "generic_decline",
                "message": "Your card was declined.",
                "payment_intent": pi,
            }
            return 402, {"error": error}
        self._deliver_later([self.event("payment_intent.succeeded", pi)])
        return 200, pi


def _error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None) -> web.Response:
    body = {"error": {"type": kind, "message": message, **({"code": code} if code else {})}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


@web.middleware
async def _api_guard(request: web.Request, handler):
    fake: FakeStripe = request.app[FAKE]
    if not request.path.startswith("/v1/"):
        return await handler(request)
    if request.headers.get("Authorization", "") != f"Bearer {fake.secret_key}":
        return _error(401, "Invalid API Key provided.", "invalid_request_error")
    raw = await request.read()
    params = decode_form(raw.decode()) if raw else dict(request.query)
    request[PARAMS] = params
    fake.requests.append((request.method, request.path, params))
    key = request.headers.get("Idempotency-Key")
    if request.method != "POST" or not key:
        return await handler(request)
    scope = f"{request.path} {key}"
    if scope in fake._idempotency:
        first_body, status, answer = fake._idempotency[scope]
        if first_body != raw:
            return _error(
                400,
                "Keys for idempotent requests can only be used with the same parameters they were first used with.",
                "idempotency_error",
            )
        return web.Response(
            status=status, body=answer, content_type="application/json", headers={"Idempotent-Replayed": "true"}
        )
    response = await handler(request)
    if len(fake._idempotency) < IDEMPOTENCY_KEYS_MAX:
        fake._idempotency[scope] = (raw, response.status, response.body)
    return response


def _json(data: dict, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")


async def _create_session(request: web.Request) -> web.Response:
    fake: FakeStripe = request.app[FAKE]
    try:
        session = fake.create_session(request[PARAMS])
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        return _error(400, f"Missing or invalid parameter: {exc}")
    if fake.pay_before_answering:
        for evt in fake.complete_session(session["id"]):
            await fake.deliver(evt)
    return _json(session)


async def _get_session(request: web.Request) -> web.Response:
    session = request.app[FAKE].sessions.get(request.match_info["id"])
    if session is None:
        return _error(404, "No such checkout.session", code="resource_missing")
    return _json({k: v for k, v in session.items() if k != "payment_intent_data"})


async def _expire_session(request: web.Request) -> web.Response:
    fake: FakeStripe = request.app[FAKE]
    session = fake.sessions.get(request.match_info["id"])
    if session is None:
        return _error(404, "No such checkout.session", code="resource_missing")
    if session["status"] != "open":
        return _error(
            400, f"Only Checkout Sessions with a status in [open] can be expired. This one is {session['status']}."
        )
    fake._deliver_later([fake.expire_session(session["id"])])
    return _json({k: v for k, v in session.items() if k != "payment_intent_data"})


async def _create_payment_intent(request: web.Request) -> web.Response:
    try:
        status, body = request.app[FAKE].create_payment_intent(request[PARAMS])
    except (KeyError, TypeError, ValueError) as exc:
        return _error(400, f"Missing or invalid parameter: {exc}")
    return _json(body, status)


async def _create_refund(request: web.Request) -> web.Response:
    fake: FakeStripe = request.app[FAKE]
    pi_id = request[PARAMS].get("payment_intent", "")
    if pi_id not in fake.payment_intents:
        return _error(404, "No such payment_intent", code="resource_missing")
    evt = fake.refund(pi_id)
    fake._deliver_later([evt])
    pi = fake.payment_intents[pi_id]
    refund = {"id": fake._id("re"), "object": "refund", "amount": pi["amount"], "payment_intent": pi_id}
    return _json({**refund, "currency": pi["currency"], "status": "succeeded"})


# --- the customer's side and the test controls -------------------------------------------------------


async def _pay_page(request: web.Request) -> web.Response:
    session = request.app[FAKE].sessions.get(request.match_info["id"])
    if session is None:
        raise web.HTTPNotFound()
    amount = f"{session['amount_total']} {session['currency'].upper()} (minor units)"
    page = (
        "<!doctype html><title>Fake Stripe Checkout</title><h1>Fake Stripe Checkout</h1>"
        f"<p>Session {html.escape(session['id'])}: {html.escape(amount)}, status {html.escape(session['status'])}</p>"
        f'<form method="post" action="/pay/{html.escape(session["id"])}"><button>Pay</button></form>'
    )
    return web.Response(text=page, content_type="text/html")


async def _pay(request: web.Request) -> web.Response:
    fake: FakeStripe = request.app[FAKE]
    sid = request.match_info["id"]
    if sid not in fake.sessions:
        raise web.HTTPNotFound()
    if fake.sessions[sid]["status"] == "open":
        fake._deliver_later(fake.complete_session(sid))
    target = (fake.sessions[sid].get("success_url") or "/").replace("{CHECKOUT_SESSION_ID}", sid)
    raise web.HTTPSeeOther(target)


async def _done(request: web.Request) -> web.Response:
    """Where `sidecar dev` sends the customer back after Checkout."""
    order = html.escape(request.query.get("order", ""))
    word = "canceled" if request.query.get("canceled") else "paid: the credits arrive with the webhook"
    return web.Response(
        text=f"<!doctype html><title>Done</title><p>Order {order} {word}.</p>", content_type="text/html"
    )


async def _control(request: web.Request) -> web.Response:
    """POST /_fake/sessions/{id}/complete | /_fake/sessions/{id}/expire: the events, delivered."""
    fake: FakeStripe = request.app[FAKE]
    sid, action = request.match_info["id"], request.match_info["action"]
    if sid not in fake.sessions:
        return _error(404, "No such checkout.session", code="resource_missing")
    events = fake.complete_session(sid) if action == "complete" else [fake.expire_session(sid)]
    deliveries = [await fake.deliver(e) for e in events] if fake.webhook_url else []
    return _json({"events": [e["id"] for e in events], "deliveries": [d.status for d in deliveries]})


def build_app(fake: FakeStripe | None = None) -> web.Application:
    app = web.Application(middlewares=[_api_guard])
    app[FAKE] = fake or FakeStripe()
    app.router.add_post("/v1/checkout/sessions", _create_session)
    app.router.add_get("/v1/checkout/sessions/{id}", _get_session)
    app.router.add_post("/v1/checkout/sessions/{id}/expire", _expire_session)
    app.router.add_post("/v1/payment_intents", _create_payment_intent)
    app.router.add_post("/v1/refunds", _create_refund)
    app.router.add_get("/pay/{id}", _pay_page)
    app.router.add_post("/pay/{id}", _pay)
    app.router.add_get("/done", _done)
    app.router.add_post("/_fake/sessions/{id}/{action:complete|expire}", _control)

    async def close(app: web.Application) -> None:
        await app[FAKE].close()

    app.on_cleanup.append(close)
    return app


async def start(
    host: str = "127.0.0.1", port: int = 0, fake: FakeStripe | None = None
) -> tuple[web.AppRunner, FakeStripe, str]:
    """Start the fake on a port (0: any free one); returns its runner, state and base URL."""
    fake = fake or FakeStripe()
    runner = web.AppRunner(build_app(fake), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1]
    fake.public_url = f"http://{host}:{bound}"
    return runner, fake, fake.public_url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fake_stripe", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=PORT_DEFAULT)
    parser.add_argument("--webhook-url", default=None, help="where to deliver signed events")
    args = parser.parse_args(argv)
    fake = FakeStripe(
        secret_key=os.environ.get("STRIPE_SECRET_KEY", DEV_SECRET_KEY),
        webhook_secret=os.environ.get("STRIPE_WEBHOOK_SECRET", DEV_WEBHOOK_SECRET),
        webhook_url=args.webhook_url,
    )

    async def run() -> None:
        runner, _, url = await start(args.host, args.port, fake)
        print(f"fake stripe on {url}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
