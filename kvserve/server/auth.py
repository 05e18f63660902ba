"""API keys → tenants (`--api-keys FILE`), and per-key request rate limits.

The file is JSON mapping each key to its tenant:

    {"sk-alpha": {"tenant": "alpha", "requests_per_minute": 600},
     "sk-ops":   {"tenant": "ops", "admin": true}}

    tenant                 required: the cache namespace (and, later, the share of the engine)
    admin                  may use the admin routes (GET/DELETE /v1/cache, /metrics with --metrics-auth)
    requests_per_minute    a token bucket of that many requests, refilled evenly over a minute;
                           past it: 429 with Retry-After (seconds until the next request is allowed)

A key is read from `Authorization: Bearer <key>` (OpenAI), `x-api-key: <key>` (Anthropic), or the
access key id of a SigV4 `Authorization: AWS4-HMAC-SHA256 Credential=<key>/...` header (Bedrock;
the signature itself is not verified). WebSocket clients may pass `?api_key=<key>` too, since
browsers cannot set headers on a WebSocket.

Without a keys file everyone is one anonymous tenant with admin rights, and all requests share
one cache namespace. With one, a missing or unknown key is a 401, and the tenant id salts the
first KV block of every request, so tenants never share cached KV.

Keys are held only as SHA-256 digests and compared with `hmac.compare_digest` against every
stored digest, so the time taken does not depend on how much of a guess is right. The file is
read again on SIGHUP (lifecycle.py); a bad file keeps the keys in force. Keys never reach the
logs: a key is named by `key_id`, the first 8 hex digits of its digest.
"""

from __future__ import annotations

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
KEY_FIELDS = {"tenant", "admin", "requests_per_minute"}


@dataclass(frozen=True)
class Principal:
    tenant: str | None
    admin: bool
    requests_per_minute: float | None = None   # None: no rate limit
    key_id: str | None = None                  # the key's digest prefix: names it in logs and buckets


OPEN = Principal(ANONYMOUS_TENANT, admin=True)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class ApiKeys:
    def __init__(self, keys: Mapping[str, Principal]):
        self._entries = [(_digest(key), Principal(p.tenant, p.admin, p.requests_per_minute, _digest(key).hex()[:8]))
                         for key, p in keys.items()]

    def __len__(self) -> int:
        return len(self._entries)

    @classmethod
    def load(cls, path: str | Path) -> "ApiKeys":
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ConfigError(f"--api-keys {path}: cannot read a JSON object of keys: {error}") from None
        if not isinstance(raw, dict) or not raw:
            raise ConfigError(f"--api-keys {path}: expected a non-empty JSON object {{key: {{\"tenant\": ...}}}}")
        keys = {}
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
            keys[key] = Principal(entry["tenant"], bool(entry.get("admin", False)), rpm)
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
    state.rate_limits.admit(principal)
    return principal


def require_admin(principal: Principal) -> None:
    if not principal.admin:
        raise APIError(403, "this endpoint needs an admin API key", type="permission_error", code="not_admin")
