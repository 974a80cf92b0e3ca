"""The endpoint's API key: where it comes from, how clients send it, how the server checks it.

The key is looked up in this order: an explicit value, the ``SER_RAY_API_KEY`` environment variable,
a key file (``--api-key-file``, default ``~/.config/ser-ray/api-key``). ``ser-ray serve`` creates the
default file (mode 0600, a random 256-bit key) when there is no key at all, so the server and a
client run by the same user on the same machine agree without any set-up.

Clients send ``Authorization: Bearer <key>`` (or ``X-API-Key: <key>``). The server keeps only the
key's SHA-256, so the key itself is never in the Serve config, its logs or the dashboard.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

ENV = "SER_RAY_API_KEY"
DEFAULT_KEY_FILE = Path("~/.config/ser-ray/api-key")


def _read(path: Path) -> str | None:
    try:
        key = path.expanduser().read_text().strip()
    except FileNotFoundError:
        return None
    return key or None


def resolve_key(api_key: str | None = None, key_file: str | None = None, create: bool = False) -> str | None:
    """The API key (see the module docstring for the order); with ``create``, a new default key file
    is written when there is no key anywhere. ``None`` when there is none."""
    if api_key:
        return api_key
    if os.environ.get(ENV, "").strip():
        return os.environ[ENV].strip()
    if key_file:
        key = _read(Path(key_file))
        if key is None:
            raise FileNotFoundError(f"API key file {key_file} does not exist or is empty")
        return key
    key = _read(DEFAULT_KEY_FILE)
    if key is None and create:
        path = DEFAULT_KEY_FILE.expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        key = secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key + "\n")
    return key


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def client_headers(api_key: str | None = None) -> dict:
    """Headers that authenticate a client request (empty when no key is configured)."""
    key = resolve_key(api_key)
    return {"Authorization": f"Bearer {key}"} if key else {}


def presented_key(headers: dict[str, str]) -> str | None:
    """The key a request presents (``headers`` with lower-case names), if any."""
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return headers.get("x-api-key") or None


def key_matches(presented: str | None, expected_sha256: str) -> bool:
    return presented is not None and hmac.compare_digest(digest(presented), expected_sha256)
