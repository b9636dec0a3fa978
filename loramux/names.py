"""Tenant and version names, and ``tenant[@version]`` references.

Names end up in file paths, URLs and Prometheus labels, so they are validated here, once,
before anything else sees them. The rule is Kubernetes' DNS-1123 label: lower-case
alphanumerics and '-', starting and ending with an alphanumeric, at most 63 characters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated

from pydantic import AfterValidator

DNS1123_LABEL_MAX = 63
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class InvalidName(ValueError):
    """A tenant or version name that is not a DNS-1123 label."""


def validate_label(value: str, what: str = "name") -> str:
    """Return ``value`` if it is a DNS-1123 label, else raise :class:`InvalidName` saying why."""
    if not isinstance(value, str) or not value:
        raise InvalidName(f"{what} must be a non-empty string")
    if len(value) > DNS1123_LABEL_MAX:
        raise InvalidName(f"{what} {value[:70]!r} is longer than {DNS1123_LABEL_MAX} characters")
    if not _DNS1123_LABEL.fullmatch(value):
        raise InvalidName(
            f"{what} {value[:70]!r} is not a DNS-1123 label "
            "(lower-case letters, digits and '-', starting and ending with a letter or digit)"
        )
    return value


# Field types for pydantic models (manifest, training config, sidecar desired set): the same
# DNS-1123 check, with a message that names the field.
TenantName = Annotated[str, AfterValidator(lambda v: validate_label(v, "tenant"))]
VersionName = Annotated[str, AfterValidator(lambda v: validate_label(v, "version"))]


@dataclass(frozen=True, slots=True)
class AdapterRef:
    """One adapter version: the identity that travels with a request and names files on disk."""

    tenant: str
    version: str

    def __post_init__(self) -> None:
        validate_label(self.tenant, "tenant")
        validate_label(self.version, "version")

    def __str__(self) -> str:
        return f"{self.tenant}@{self.version}"


@dataclass(frozen=True, slots=True)
class TenantRef:
    """What a client asks for: a tenant, and optionally a pinned version of it."""

    tenant: str
    version: str | None = None

    def __post_init__(self) -> None:
        validate_label(self.tenant, "tenant")
        if self.version is not None:
            validate_label(self.version, "version")

    @classmethod
    def parse(cls, text: str) -> TenantRef:
        """Parse ``tenant`` or ``tenant@version``."""
        if not isinstance(text, str):
            raise InvalidName("adapter reference must be a string")
        tenant, sep, version = text.partition("@")
        if sep and not version:
            raise InvalidName(f"reference {text[:70]!r} has an empty version after '@'")
        return cls(tenant, version or None)

    def __str__(self) -> str:
        return self.tenant if self.version is None else f"{self.tenant}@{self.version}"
