"""The sidecar's exceptions: one root, four branches, and what each becomes.

Every exception class the package defines derives from `Error`, through one of its four branches
(tests/test_errors.py walks the package to check it). A class that must also be a library's exception
(`ValueError`, `aiohttp.ClientError`) inherits both. Each class stays in the module it belongs to and is
re-based here; this module imports nothing of the package, so anything may import it.

    Error
    ├── ApiError                    IS an HTTP answer: carries `status`, `message`, `code`
    │   ├── SidecarError            proxy API (protocols/errors.py): `kind` -> status in KINDS (400-504),
    │   │                           answered in the envelope of the protocol the client spoke
    │   └── AdminError              admin API (control/http.py): its own status (400 401 403 404 409 502 503),
    │                               answered in the admin envelope
    ├── DomainError                 a rule or a dependency said no, below HTTP: never answered as it is;
    │   │                           its caller makes it an ApiError, a fallback, a stream's end, a dead letter
    │   ├── MoneyError              (ValueError) not an exact amount -> admin 400 invalid_amount;
    │   │                           in the config file, a ConfigError
    │   ├── CatalogError            (ValueError) the model catalog cannot price a model exactly -> in the
    │   │                           config, a ConfigError naming the model; in `sidecar catalog`, its note
    │   ├── GrantConflict           a grant id reused with another amount or kind -> admin 409 grant_conflict
    │   ├── BalanceLimitExceeded    a grant past money.AMOUNT_MICRO_MAX -> admin 409 balance_limit
    │   ├── ExpiryPending           a top-up while the expired balance is still held by calls (not
    │   │                           forfeited yet) -> webhook 503 (redelivered), admin 409 expiry_pending
    │   ├── KeyRejected             the provider refused a BYOK key -> admin 400 key_rejected
    │   ├── ValidationUnavailable   the provider could not be asked -> admin 502 validation_unavailable
    │   ├── VaultError              a sealed key cannot be opened -> proxy 500 byok_key_unusable;
    │   │   │                       `sidecar kek rotate`: the key is reported and left as it is
    │   │   └── KekMissing          its KEK is not configured -> at start, the sidecar refuses to start
    │   ├── WorkspaceNotServed      a valid key of a workspace this data plane does not serve
    │   │                           (server.workspaces) -> proxy 401 workspace_not_served
    │   ├── ReloadDeclined          the payment provider refused an auto-reload's payment -> the reload
    │   │                           fails, counts toward disabling, and is notified; never reaches a client
    │   ├── SignatureInvalid        (notify/signing.py) a webhook signature that does not verify: what a
    │   │                           customer's receiver raises; the sidecar only signs
    │   ├── BudgetExceeded          buffered answers past the process's byte budget -> proxy 503, unbilled
    │   ├── QueryRefused            (ValueError) a read-side filter, period or cursor that cannot be read
    │   │                           (statements/filters.py) -> admin 400 with its code
    │   ├── ArchiveRefused          `sidecar ledger archive` will not archive a month (an open statement
    │   │                           period, an invoice pointing into it) -> one line, exit 1
    │   ├── InvalidEvent            (ValueError) a stream entry that cannot become a ledger row -> the
    │   │                           flusher dead-letters it; never reaches a client
    │   ├── OrderConflict           a client order id reused with other figures -> admin 409 order_conflict
    │   ├── OrderNotFound           no such payment order in the workspace -> admin 404 order_not_found
    │   ├── OrderStateError         the order's state forbids the action (mark-paid of a closed order) ->
    │   │                           admin 409 order_state
    │   ├── StripeNotConfigured     a Stripe order or webhook without payments.stripe -> admin 409
    │   │                           provider_not_configured; the webhook route 404
    │   ├── PaymentsUnavailable     Stripe unreachable or refusing -> admin 502 payment_provider_error (the
    │   │                           order is kept; the same request retries with the same idempotency key)
    │   ├── PaymentDeclined         an off-session PaymentIntent declined -> its reload order fails
    │   ├── WebhookRefused          a webhook not verifiably Stripe's (signature, stale, malformed) ->
    │   │                           400 invalid_signature, nothing changes
    │   ├── SSEError                (ValueError) a provider's stream breaks a framing bound -> the stream
    │   │                           ends as the provider's failure (docs/architecture.md, the lifecycle)
    │   └── RedirectRefused         (aiohttp.ClientError) a provider answered 3xx -> as if unreachable:
    │                               the next target, else proxy 502; a BYOK key being validated: admin 502
    ├── StartupError                a process cannot start: one line on stderr and a non-zero exit;
    │   │                           never reaches a client
    │   ├── ConfigError             (ValueError) the config names a bad key or value
    │   ├── DevError                `sidecar dev` cannot start (devtools)
    │   ├── EmbeddedError           (RuntimeError) an embedded Redis or Postgres cannot start (devtools)
    │   └── StartError              (RuntimeError) a supervised child died or stayed silent (devtools)
    └── ControlFlow                 private: raised and caught inside one module, never escapes it
        ├── _Unreachable            proxy/handler.py: the provider was not reached -> next target, else
        │                           proxy 502 (504 on a timeout) upstream_unavailable
        ├── _ClientGone             proxy/relay.py: the client left mid-stream -> relay.StreamEnd
        ├── _BadRequest             devtools/mock_provider.py: the mock provider's own 400
        ├── _Malformed              (ValueError) billing/webhooks.py: a signed event of a shape not read
                                    -> kept for review
        └── _CliError               admin_cli.py: `sidecar admin` cannot build or send its request ->
                                    one line on stderr, exit 2

Anything else that escapes a handler is a bug: logged whole, answered 500 in the port's envelope (or, once
a stream has begun, ended with the protocol's error event); an admitted call is still settled exactly once.

Names ending in `Error` are exceptions. A value that describes an error and is never raised is named for
what it is: `relay.UpstreamErrorAnswer` (a provider's error answer, read), `serving.ErrorBody` (the
function that writes an envelope).
"""

from __future__ import annotations


class Error(Exception):
    """The root of every exception the sidecar defines; never raised itself."""


class ApiError(Error):
    """An HTTP answer: the API that raised it renders `status`, `message` and `code` in its envelope."""


class DomainError(Error):
    """A rule or a dependency said no, below HTTP; the caller decides what the client gets."""


class StartupError(Error):
    """A process cannot start; said in one line to whoever started it, never to a client."""


class ControlFlow(Error):
    """A private signal between two points of one module; it never escapes that module."""
