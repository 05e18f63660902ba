"""API keys → tenants (`--api-keys FILE`), per-key request rate limits, and each tenant's share
of the engine and its limits.

The file is JSON mapping each key to its tenant:

    {"sk-alpha": {"tenant": "alpha", "requests_per_minute": 600, "weight": 2, "max_concurrent": 8,
                  "tokens_per_minute": 200000},
     "sk-bulk":  {"tenant": "bulk", "weight": 0.5, "priority": 10},
     "sk-ops":   {"tenant": "ops", "admin": true}}

    tenant                 required: the cache namespace and the unit of the fields below
    admin                  may use the admin routes (GET/DELETE /v1/cache, /metrics with --metrics-auth)
    requests_per_minute    per key: a token bucket of that many requests, refilled evenly over a
                           minute; past it: 429 `rate_limited` with Retry-After (seconds until the
                           next request is allowed)
    weight                 per tenant (number > 0, default 1): the tenant's share of the engine; the
                           scheduler divides step tokens between tenants with work in proportion
                           to their weights
    priority               per tenant (integer, default 0): the default priority of the tenant's
                           requests (lower runs first, as in vLLM; --scheduling-policy
                           priority); a request's own `priority` field overrides it when the
                           body sets it
    max_concurrent         per tenant (integer >= 1, default unlimited): at most that many requests
                           (choices) of the tenant in flight at once; one more: 429
                           `tenant_concurrency` with Retry-After: 1; a single request with more
                           choices than that: 400 `exceeds_max_concurrent`
    tokens_per_minute      per tenant (number > 0, default unlimited): a token bucket of that many
                           tokens, refilled evenly over a minute. A request is charged its prompt
                           tokens (once per prompt) plus max_tokens (per choice) when it is
                           admitted, after tokenizing; when it ends (finished, aborted, client
                           gone, failed) the max_tokens it did not use are refunded. A charge over
                           what the bucket holds: 429 `tenant_tokens_per_minute` with Retry-After
                           = the seconds until it will hold enough; a charge over the whole bucket
                           (it can never fit): 400 `exceeds_tokens_per_minute`

A tenant may have several keys; the four per-tenant fields must then be the same on all of them
(a field left out counts as its default), else the file is refused. Batch-job lines (background
requests) run with their tenant's weight and priority but are exempt from max_concurrent and
tokens_per_minute: the batch runner bounds them. The limits are kept by `TenantLimits`; its
in-flight counts and buckets are per tenant name, so they survive a SIGHUP reload, which puts the
new values into force for the next request.

A key is read from `Authorization: Bearer <key>` (OpenAI), `x-api-key: <key>` (Anthropic), or the
access key id of a SigV4 `Authorization: AWS4-HMAC-SHA256 Credential=<key>/...` header (Bedrock;
the signature itself is not verified). WebSocket clients may pass `?api_key=<key>` too, since
browsers cannot set headers on a WebSocket.

Without a keys file everyone is one anonymous tenant with admin rights, and all requests share
one cache namespace (and no tenant limits apply). With one, a missing or unknown key is a 401,
and the tenant id salts the first KV block of every request, so tenants never share cached KV.
In metrics the anonymous tenant's label is "" (key-file tenant names are never empty).

Keys are held only as SHA-256 digests and compared with `hmac.compare_digest` against every
stored digest, so the time taken does not depend on how much of a guess is right. The file is
read again on SIGHUP (lifecycle.py); a bad file keeps the keys in force. Keys never reach the
logs: a key is named by `key_id`, the first 8 hex digits of its digest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from kvserve.config import ConfigError
from kvserve.server.protocol import APIError

ANONYMOUS_TENANT = None
SHARE_FIELDS = ("weight", "priority", "max_concurrent", "tokens_per_minute")   # per tenant
KEY_FIELDS = {"tenant", "admin", "requests_per_minute", *SHARE_FIELDS}
CONCURRENCY_RETRY_AFTER_S = 1


@dataclass(frozen=True)
class TenantShare:
    """A tenant's share of the engine and its limits (the per-tenant fields of the keys file)."""
    tenant: str | None
    weight: float = 1.0
    priority: int = 0
    max_concurrent: int | None = None          # None: unlimited
    tokens_per_minute: float | None = None     # None: unlimited

    @property
    def label(self) -> str:
        """The tenant's metrics label: its name, or "" for the anonymous tenant."""
        return self.tenant or ""


@dataclass(frozen=True)
class Principal:
    tenant: str | None
    admin: bool
    requests_per_minute: float | None = None   # None: no rate limit
    key_id: str | None = None                  # the key's digest prefix: names it in logs and buckets
    share: TenantShare | None = None           # None: the defaults (weight 1, priority 0, no limits)


OPEN = Principal(ANONYMOUS_TENANT, admin=True)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def _is_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _share(entry: dict, where: str) -> TenantShare:
    """The per-tenant fields of one key entry, validated."""
    weight = entry.get("weight", 1.0)
    if not _is_number(weight) or not weight > 0:
        raise ConfigError(f"{where}: weight must be a positive number (the tenant's share of the engine), "
                          f"got {weight!r}")
    priority = entry.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise ConfigError(f"{where}: priority must be an integer (lower runs first), got {priority!r}")
    max_concurrent = entry.get("max_concurrent")
    if max_concurrent is not None and (isinstance(max_concurrent, bool) or not isinstance(max_concurrent, int)
                                       or max_concurrent < 1):
        raise ConfigError(f"{where}: max_concurrent must be an integer >= 1, got {max_concurrent!r}")
    tpm = entry.get("tokens_per_minute")
    if tpm is not None and (not _is_number(tpm) or not tpm > 0):
        raise ConfigError(f"{where}: tokens_per_minute must be a positive number, got {tpm!r}")
    return TenantShare(entry["tenant"], float(weight), priority, max_concurrent,
                       None if tpm is None else float(tpm))


def _add_share(shares: dict[str, TenantShare], share: TenantShare, where: str) -> None:
    """Limits are per tenant: every key of a tenant must give the same ones."""
    known = shares.setdefault(share.tenant, share)
    if known != share:
        differ = [f"{name} {getattr(known, name)!r} vs {getattr(share, name)!r}" for name in SHARE_FIELDS
                  if getattr(known, name) != getattr(share, name)]
        raise ConfigError(f"{where}: tenant {share.tenant!r} has other keys with different limits "
                          f"({'; '.join(differ)}); {', '.join(SHARE_FIELDS)} are per tenant, so every key of "
                          f"a tenant must give the same values (a field left out counts as its default)")


class ApiKeys:
    def __init__(self, keys: Mapping[str, Principal]):
        self._entries = []
        self._shares: dict[str, TenantShare] = {}
        for n, (key, p) in enumerate(keys.items()):
            share = p.share or TenantShare(p.tenant)
            if share.tenant != p.tenant:
                raise ConfigError(f"key {n + 1}: its share names tenant {share.tenant!r}, not {p.tenant!r}")
            _add_share(self._shares, share, f"key {n + 1}")
            self._entries.append((_digest(key), dataclasses.replace(p, key_id=_digest(key).hex()[:8], share=share)))

    def __len__(self) -> int:
        return len(self._entries)

    def share(self, tenant: str | None) -> TenantShare:
        """The tenant's share and limits (the defaults for a tenant no key names, e.g. the
        anonymous one, or a batch's tenant whose keys were removed)."""
        return self._shares.get(tenant) or TenantShare(tenant)

    @classmethod
    def load(cls, path: str | Path) -> "ApiKeys":
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ConfigError(f"--api-keys {path}: cannot read a JSON object of keys: {error}") from None
        if not isinstance(raw, dict) or not raw:
            raise ConfigError(f"--api-keys {path}: expected a non-empty JSON object {{key: {{\"tenant\": ...}}}}")
        keys, shares = {}, {}
        for n, (key, entry) in enumerate(raw.items()):
            where = f"--api-keys {path}: entry {n + 1}"   # never the key itself
            if not key:
                raise ConfigError(f"{where}: a key must not be empty")
            if not isinstance(entry, dict) or not isinstance(entry.get("tenant"), str) or not entry["tenant"]:
                raise ConfigError(f"{where}: expected {{\"tenant\": \"<name>\"}}")
            unknown = set(entry) - KEY_FIELDS
            if unknown:
                raise ConfigError(f"{where}: unknown fields {', '.join(sorted(unknown))} "
                                  f"(known: {', '.join(sorted(KEY_FIELDS))})")
            rpm = entry.get("requests_per_minute")
            if rpm is not None and (isinstance(rpm, bool) or not isinstance(rpm, (int, float)) or not rpm > 0):
                raise ConfigError(f"{where}: requests_per_minute must be a positive number, got {rpm!r}")
            share = _share(entry, where)
            _add_share(shares, share, where)
            keys[key] = Principal(entry["tenant"], bool(entry.get("admin", False)), rpm, share=share)
        return cls(keys)

    def authenticate(self, key: str | None) -> Principal:
        if not key:
            raise APIError(401, "an API key is required (Authorization: Bearer <key>)",
                           type="authentication_error", code="missing_api_key")
        digest = _digest(key)
        found = None
        for stored, principal in self._entries:   # every entry, no early exit: constant time
            if hmac.compare_digest(stored, digest):
                found = principal
        if found is None:
            raise APIError(401, "the API key is not valid", type="authentication_error", code="invalid_api_key")
        return found


class RateLimits:
    """One token bucket per key with a `requests_per_minute`: `capacity` requests at once, refilled
    at capacity/60 per second. Thread-safe (the WebSocket and HTTP handlers share it)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}   # key_id → (tokens, as of time)
        self._lock = threading.Lock()

    def admit(self, principal: Principal) -> None:
        rate = principal.requests_per_minute
        if rate is None or principal.key_id is None:
            return
        now = self._clock()
        with self._lock:
            tokens, then = self._buckets.get(principal.key_id, (rate, now))
            tokens = min(rate, tokens + (now - then) * rate / 60.0)
            if tokens < 1.0:
                self._buckets[principal.key_id] = (tokens, now)
                wait_s = math.ceil((1.0 - tokens) * 60.0 / rate)
                raise APIError(429, f"this API key is limited to {rate:g} requests per minute; retry in {wait_s} s",
                               type="rate_limit_error", code="rate_limited", headers={"Retry-After": str(wait_s)})
            self._buckets[principal.key_id] = (tokens - 1.0, now)


class TenantLimits:
    """Each tenant's requests in flight (against `max_concurrent`) and its token bucket (against
    `tokens_per_minute`). The shares are looked up from the keys in force at each request
    (`keys()`: the app's current ApiKeys, or None without a keys file), while the counts and
    buckets live here, by tenant name: a SIGHUP reload changes the limits, not the counts.
    Thread-safe; `clock` is monotonic seconds (injectable for tests)."""

    def __init__(self, keys: Callable[[], ApiKeys | None] = lambda: None,
                 clock: Callable[[], float] = time.monotonic):
        self._keys = keys
        self._clock = clock
        self._in_flight: dict[str | None, int] = {}
        self._buckets: dict[str | None, tuple[float, float]] = {}   # tenant → (tokens, as of time)
        self._lock = threading.Lock()

    def share(self, tenant: str | None) -> TenantShare:
        keys = self._keys()
        return keys.share(tenant) if keys is not None else TenantShare(tenant)

    def in_flight(self, tenant: str | None) -> int:
        with self._lock:
            return self._in_flight.get(tenant, 0)

    def tokens(self, tenant: str | None) -> float | None:
        """What the tenant's bucket holds now (None: no tokens_per_minute)."""
        rate = self.share(tenant).tokens_per_minute
        if rate is None:
            return None
        with self._lock:
            return self._refilled(tenant, rate, self._clock())

    def hold(self, share: TenantShare, num_choices: int) -> "TenantLease":
        """Take `num_choices` concurrency slots, or raise 429 (400 if they can never fit). The
        lease must be released exactly once, however the request ends."""
        limit = share.max_concurrent
        with self._lock:
            held = self._in_flight.get(share.tenant, 0)
            if limit is not None and num_choices > limit:
                raise APIError(400, f"this request has {num_choices} choices, but tenant {share.tenant!r} may have "
                               f"at most {limit} in flight (max_concurrent); ask for fewer choices (n)",
                               param="n", code="exceeds_max_concurrent")
            if limit is not None and held + num_choices > limit:
                raise APIError(429, f"tenant {share.tenant!r} already has {held} requests in flight, the most its "
                               f"max_concurrent ({limit}) allows; retry when one has finished",
                               type="rate_limit_error", code="tenant_concurrency",
                               headers={"Retry-After": str(CONCURRENCY_RETRY_AFTER_S)})
            self._in_flight[share.tenant] = held + num_choices
        return TenantLease(self, share, num_choices)

    def _charge(self, share: TenantShare, tokens: int) -> bool:
        """Take `tokens` from the tenant's bucket (False: it has no tokens_per_minute), or raise."""
        rate = share.tokens_per_minute
        if rate is None:
            return False
        if tokens > rate:
            raise APIError(400, f"this request needs {tokens} tokens (its prompt plus max_tokens per choice), more "
                           f"than tenant {share.tenant!r} may use in a minute (tokens_per_minute {rate:g}), so it "
                           f"can never be admitted; lower max_tokens or shorten the prompt",
                           param="max_tokens", code="exceeds_tokens_per_minute")
        now = self._clock()
        with self._lock:
            available = self._refilled(share.tenant, rate, now)
            if available < tokens:
                wait_s = max(1, math.ceil((tokens - available) * 60.0 / rate))
                raise APIError(429, f"tenant {share.tenant!r} is limited to {rate:g} tokens per minute (prompt plus "
                               f"max_tokens); this request needs {tokens}, {int(available)} are available now; "
                               f"retry in {wait_s} s", type="rate_limit_error", code="tenant_tokens_per_minute",
                               headers={"Retry-After": str(wait_s)})
            self._buckets[share.tenant] = (available - tokens, now)
        return True

    def _release(self, share: TenantShare, num_choices: int, refund: float) -> None:
        with self._lock:
            left = self._in_flight.get(share.tenant, 0) - num_choices
            if left > 0:
                self._in_flight[share.tenant] = left
            else:
                self._in_flight.pop(share.tenant, None)
            if refund > 0 and share.tenant in self._buckets:
                rate = self.share(share.tenant).tokens_per_minute   # the limit in force now
                if rate is not None:
                    now = self._clock()
                    self._buckets[share.tenant] = (min(rate, self._refilled(share.tenant, rate, now) + refund), now)

    def _refilled(self, tenant: str | None, rate: float, now: float) -> float:
        """The bucket's tokens at `now` (full when new; capped at the current capacity). Under the lock."""
        tokens, then = self._buckets.get(tenant, (rate, now))
        return min(rate, tokens + max(0.0, now - then) * rate / 60.0)


class TenantLease:
    """What one interactive request holds of its tenant's limits: concurrency slots from admission,
    then the token charge. `release(generated)` gives both back (the slots, and the max_tokens not
    used) exactly once; later calls do nothing."""

    def __init__(self, limits: TenantLimits, share: TenantShare, num_choices: int):
        self.limits = limits
        self.share = share
        self.num_choices = num_choices
        self.charged_prompt_tokens = 0
        self.charged_max_tokens = 0
        self._released = False

    def charge(self, prompt_tokens: int, max_tokens: int) -> None:
        """Charge the bucket prompt_tokens + max_tokens (all choices'), or raise 429/400."""
        if self.limits._charge(self.share, prompt_tokens + max_tokens):
            self.charged_prompt_tokens, self.charged_max_tokens = prompt_tokens, max_tokens

    def release(self, generated_tokens: int = 0, never_ran: bool = False) -> None:
        """`generated_tokens`: all choices' (the refund is the max_tokens charged less these);
        `never_ran`: the request failed before it reached the engine, so the whole charge comes back."""
        if self._released:
            return
        self._released = True
        refund = max(0, self.charged_max_tokens - generated_tokens)
        if never_ran:
            refund = self.charged_prompt_tokens + self.charged_max_tokens
        self.limits._release(self.share, self.num_choices, refund)


def presented_key(headers: Mapping[str, str], query: Mapping[str, str] | None = None) -> str | None:
    authorization = headers.get("authorization", "")
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    if scheme == "AWS4-HMAC-SHA256":
        return sigv4_access_key_id(authorization)
    if headers.get("x-api-key"):
        return headers["x-api-key"]
    if query and query.get("api_key"):
        return query["api_key"]
    return None


def sigv4_access_key_id(authorization: str) -> str | None:
    """'AWS4-HMAC-SHA256 Credential=AKID/20260101/us-east-1/bedrock/aws4_request, ...' → 'AKID';
    None unless it is a SigV4 header with a well-formed credential scope."""
    scheme, _, params = authorization.strip().partition(" ")
    if scheme != "AWS4-HMAC-SHA256":
        return None
    for field in params.split(","):
        name, _, value = field.strip().partition("=")
        if name == "Credential":
            scope = value.split("/")
            return scope[0] if len(scope) == 5 and all(scope) and scope[4] == "aws4_request" else None
    return None


def authenticate(state, headers: Mapping[str, str], query: Mapping[str, str] | None = None) -> Principal:
    """Who is asking, given an app's state (its `api_keys` and `rate_limits`): 401 without a valid
    key when keys are configured, 429 past the key's request rate."""
    if state.api_keys is None:
        return OPEN
    principal = state.api_keys.authenticate(presented_key(headers, query))
    try:
        state.rate_limits.admit(principal)
    except APIError as error:
        metrics = getattr(state, "metrics", None)
        if metrics is not None:
            metrics.tenant_rejections.labels(principal.tenant or "", error.code).inc()
        raise
    return principal


def require_admin(principal: Principal) -> None:
    if not principal.admin:
        raise APIError(403, "this endpoint needs an admin API key", type="permission_error", code="not_admin")
