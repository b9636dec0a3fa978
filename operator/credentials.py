"""S3 credentials from a LoraAdapter's ``source.credentialsSecret``: pure functions.

The values go only into the desired entry sent to the pod's sidecar; they are never logged,
never put into status or events. Problems are described by key name only.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

KEYS = {
    "AWS_ACCESS_KEY_ID": "access_key_id",
    "AWS_SECRET_ACCESS_KEY": "secret_access_key",
    "AWS_SESSION_TOKEN": "session_token",
    "AWS_REGION": "region",
    "AWS_ENDPOINT_URL": "endpoint_url",
}
REQUIRED = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
_REGION = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


def secret_values(secret: Mapping[str, Any]) -> dict[str, str]:
    """``data`` (base64) and ``stringData`` (plain) of a Secret object, decoded."""
    values: dict[str, str] = {}
    for key, raw in (secret.get("data") or {}).items():
        try:
            values[key] = base64.b64decode(raw, validate=True).decode()
        except (binascii.Error, ValueError, TypeError, UnicodeDecodeError):
            values[key] = ""
    for key, raw in (secret.get("stringData") or {}).items():
        if isinstance(raw, str):
            values[key] = raw
    return values


def credentials_from_secret(
    secret: Mapping[str, Any], name: str
) -> tuple[dict[str, str] | None, str | None]:
    """``(credentials, None)`` for the sidecar's desired entry, or ``(None, problem)``."""
    values = {k: v.strip() for k, v in secret_values(secret).items()}
    missing = [k for k in REQUIRED if not values.get(k)]
    if missing:
        return None, f"Secret {name!r} lacks {', '.join(missing)}"
    creds = {KEYS[k]: values[k] for k in KEYS if values.get(k)}
    region = creds.get("region")
    if region is not None and not _REGION.match(region):
        return None, f"Secret {name!r}: AWS_REGION is not a region name"
    endpoint = creds.get("endpoint_url")
    if endpoint is not None:
        parts = urlsplit(endpoint)
        if (parts.scheme not in ("http", "https") or not parts.hostname
                or parts.username is not None or parts.query or parts.fragment
                or any(ord(c) <= 0x20 or ord(c) == 0x7F for c in endpoint)):
            return None, f"Secret {name!r}: AWS_ENDPOINT_URL is not an http(s) URL with a host"
    return creds, None
