"""Bearer tokens from a flag/environment value or a mounted file (one rule for every process)."""

from __future__ import annotations

from pathlib import Path


def read_token(value: str | None, path: Path | None) -> str | None:
    """``value`` if set, else the stripped content of ``path`` (a mounted Secret), else None.
    The file is read on every call, so a rotated Secret takes effect."""
    if value:
        return value
    if path is not None:
        return path.read_text().strip() or None
    return None
