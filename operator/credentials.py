"""Secrets a LoraAdapter names, read into what its pods get: pure functions.

* S3 credentials from ``source.credentialsSecret``: the values go only into the desired
  entry sent to the pod's sidecar.
* API keys from ``access.secretName``: every data entry is one key; only their SHA-256
  hashes (:func:`~loramux.contracts.hash_key`) leave this module, in a
  :class:`~loramux.contracts.TenantAccess`.

Neither is ever logged, put into status or events. Problems are described by key (entry)
name only. The S3 key map and its validation are :mod:`loramux.s3`'s
(:data:`~loramux.s3.CREDENTIAL_KEYS`, :func:`~loramux.s3.credentials_from_values`).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from loramux.contracts import AccessFile, EntryCredentials, KeyGrant, TenantAccess, hash_key
from loramux.operator.model import AccessSpec
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


# --------------------------------------------------------------------------- API keys

MIN_KEY_LENGTH = 32  # shorter keys are refused (fail closed: left out of the hashes)
MAX_KEYS = 1000  # TenantAccess.key_sha256's bound

# AccessReady reasons (the condition's status in parentheses)
ACCESS_OK = "KeysLoaded"  # (True) every entry of the Secret is a usable key
KEY_TOO_SHORT = "KeyTooShort"  # (False) some entries were refused; the rest are used
SECRET_NOT_FOUND = "SecretNotFound"  # (False) no keys at all: nobody can call the tenant
NO_KEYS = "NoKeys"  # (False) the Secret holds no usable entry
TOO_MANY_KEYS = "TooManyKeys"  # (False) more than MAX_KEYS entries: none used
SECRET_UNREADABLE = "SecretUnreadable"  # (Unknown) the API server did not answer
ACCESS_FILE_KEY = "access.json"  # the pool's access Secret: an AccessFile


@dataclass(frozen=True)
class AccessOutcome:
    """A LoraAdapter's access this pass: what its pods get, and the ``AccessReady``
    condition. ``ok`` None: unknown (the Secret could not be read)."""

    access: TenantAccess
    ok: bool | None
    reason: str
    message: str

    @property
    def keys(self) -> int:
        return len(self.access.key_sha256)


def access_from_secret(secret: Mapping[str, Any] | None, spec: AccessSpec) -> AccessOutcome:
    """The tenant's :class:`~loramux.contracts.TenantAccess` from its keys Secret (``None``:
    not found). Every data entry is one API key, stripped; entries shorter than
    :data:`MIN_KEY_LENGTH` are left out. Messages name the Secret's entries, never a value,
    and only SHA-256 hashes leave this function."""
    name = spec.secret_name
    if secret is None:
        return AccessOutcome(_access(spec, ()), False, SECRET_NOT_FOUND,
                             f"Secret {name!r} not found: no key can call this tenant")
    values = secret_values(secret)
    short = sorted(entry for entry, key in values.items()
                   if len(key.strip()) < MIN_KEY_LENGTH)
    usable = [key for entry, key in sorted(values.items()) if entry not in short]
    if len(usable) > MAX_KEYS:
        return AccessOutcome(_access(spec, ()), False, TOO_MANY_KEYS,
                             f"Secret {name!r} holds {len(usable)} keys; at most {MAX_KEYS}: "
                             "none is used")
    access = _access(spec, tuple(hash_key(key) for key in usable))
    if short:
        listed = ", ".join(repr(e) for e in short[:20]) + (" ..." if len(short) > 20 else "")
        return AccessOutcome(access, False, KEY_TOO_SHORT,
                             f"Secret {name!r}: entr{'y' if len(short) == 1 else 'ies'} "
                             f"{listed} {'is' if len(short) == 1 else 'are'} shorter than "
                             f"{MIN_KEY_LENGTH} characters and "
                             f"{'was' if len(short) == 1 else 'were'} left out; "
                             f"{access_count(access)} in use")
    if not usable:
        return AccessOutcome(access, False, NO_KEYS,
                             f"Secret {name!r} holds no key: no key can call this tenant")
    return AccessOutcome(access, True, ACCESS_OK,
                         f"{access_count(access)} from Secret {name!r}")


def access_unreadable(spec: AccessSpec, problem: str,
                      last: TenantAccess | None) -> AccessOutcome:
    """The Secret could not be read (the API server failed): the last access read in this
    process if any (a blip must not lock the tenant out), else no key (fail closed)."""
    access = last if last is not None else _access(spec, ())
    return AccessOutcome(access, None, SECRET_UNREADABLE,
                         f"cannot read Secret {spec.secret_name!r}: {problem}; "
                         f"{'keeping the last keys read' if last else 'no key in use'}")


def access_count(access: TenantAccess) -> str:
    count = len(access.key_sha256)
    return f"{count} key{'' if count == 1 else 's'}"


def _access(spec: AccessSpec, hashes: tuple[str, ...]) -> TenantAccess:
    return TenantAccess(key_sha256=hashes, weight=spec.weight, limits=spec.limits)


def pool_grants_from_secret(secret: Mapping[str, Any], name: str
                            ) -> tuple[list[KeyGrant] | None, str | None]:
    """The pool-wide key grants of the pool's access Secret (its ``access.json``, an
    :class:`~loramux.contracts.AccessFile`; only ``grants`` are used), or ``(None, problem)``."""
    text = secret_values(secret).get(ACCESS_FILE_KEY)
    if not text:
        return None, f"Secret {name!r} has no {ACCESS_FILE_KEY}"
    try:
        return list(AccessFile.model_validate_json(text).grants), None
    except ValueError:
        return None, f"Secret {name!r}: {ACCESS_FILE_KEY} is not a valid access file"
