"""S3 credentials from a LoraAdapter's ``source.credentialsSecret``: pure functions.

The values go only into the desired entry sent to the pod's sidecar; they are never logged,
never put into status or events. Problems are described by key name only. The key map and
the validation are :mod:`loramux.s3`'s (:data:`~loramux.s3.CREDENTIAL_KEYS`,
:func:`~loramux.s3.credentials_from_values`).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from loramux.contracts import EntryCredentials
from loramux.s3 import CREDENTIAL_KEYS, credentials_from_values

FIELD_KEYS = {field: key for key, field in CREDENTIAL_KEYS.items()}  # access_key_id -> AWS_...


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
    """``(credential fields, None)`` for the sidecar's desired entry, or ``(None, problem)``."""
    return credentials_from_values(secret_values(secret), name)


def entry_credentials(secret: Mapping[str, Any], name: str
                      ) -> tuple[EntryCredentials | None, str | None]:
    """The Secret as a desired entry's :class:`~loramux.contracts.EntryCredentials`, or
    ``(None, problem)``; the problem names keys, never values."""
    fields, problem = credentials_from_secret(secret, name)
    if fields is None:
        return None, problem
    try:
        return EntryCredentials(**fields), None
    except ValidationError as exc:
        # pydantic's messages quote the input: name the keys only.
        keys = sorted({FIELD_KEYS.get(str(e["loc"][0]), str(e["loc"][0]))
                       for e in exc.errors() if e["loc"]})
        return None, f"Secret {name!r}: {', '.join(keys) or 'a key'} is not valid"


def secret_keys(credentials: EntryCredentials) -> set[str]:
    """The Secret keys (``AWS_*``) that ``credentials`` were read from."""
    return {key for key, field in CREDENTIAL_KEYS.items()
            if getattr(credentials, field) is not None}
