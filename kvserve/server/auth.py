"""API keys → tenants (`--api-keys FILE`).

The file is JSON mapping each key to its tenant:

    {"sk-alpha": {"tenant": "alpha"},
     "sk-ops":   {"tenant": "ops", "admin": true}}

A key is read from `Authorization: Bearer <key>` (OpenAI), `x-api-key: <key>` (Anthropic), or the
access key id of a SigV4 `Authorization: AWS4-HMAC-SHA256 Credential=<key>/...` header (Bedrock;
the signature itself is not verified). WebSocket clients may pass `?api_key=<key>` too, since
browsers cannot set headers on a WebSocket.

Without a keys file everyone is one anonymous tenant with admin rights, and all requests share
one cache namespace. With one, a missing or unknown key is a 401, and the tenant id salts the
first KV block of every request, so tenants never share cached KV.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from kvserve.config import ConfigError
from kvserve.server.protocol import APIError

ANONYMOUS_TENANT = None


@dataclass(frozen=True)
class Principal:
    tenant: str | None
    admin: bool


OPEN = Principal(ANONYMOUS_TENANT, admin=True)


class ApiKeys:
    def __init__(self, keys: Mapping[str, Principal]):
        self._keys = dict(keys)

    @classmethod
    def load(cls, path: str | Path) -> "ApiKeys":
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ConfigError(f"--api-keys {path}: cannot read a JSON object of keys: {error}") from None
        if not isinstance(raw, dict) or not raw:
            raise ConfigError(f"--api-keys {path}: expected a non-empty JSON object {{key: {{\"tenant\": ...}}}}")
        keys = {}
        for key, entry in raw.items():
            if not isinstance(entry, dict) or not isinstance(entry.get("tenant"), str) or not entry["tenant"]:
                raise ConfigError(f"--api-keys {path}: key {key[:4]}…: expected {{\"tenant\": \"<name>\"}}")
            keys[key] = Principal(entry["tenant"], bool(entry.get("admin", False)))
        return cls(keys)

    def authenticate(self, key: str | None) -> Principal:
        if not key:
            raise APIError(401, "an API key is required (Authorization: Bearer <key>)",
                           type="authentication_error", code="missing_api_key")
        principal = self._keys.get(key)
        if principal is None:
            raise APIError(401, "the API key is not valid", type="authentication_error", code="invalid_api_key")
        return principal


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


def authenticate(api_keys: ApiKeys | None, headers: Mapping[str, str],
                 query: Mapping[str, str] | None = None) -> Principal:
    if api_keys is None:
        return OPEN
    return api_keys.authenticate(presented_key(headers, query))


def require_admin(principal: Principal) -> None:
    if not principal.admin:
        raise APIError(403, "this endpoint needs an admin API key", type="permission_error", code="not_admin")
