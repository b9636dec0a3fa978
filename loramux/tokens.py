"""Bearer tokens from a flag/environment value or a mounted file (one rule for every process).

A token in a mounted Secret rotates: the kubelet swaps the file (a new inode behind the same
path). :class:`Token` re-reads the file whenever it changes, so every process - server,
sidecar, operator - accepts and sends the new token without a restart.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

log = logging.getLogger("loramux.tokens")


def read_token(value: str | None, path: Path | None) -> str | None:
    """``value`` if set, else the stripped content of ``path`` (a mounted Secret), else None.
    The file is read on every call, so a rotated Secret takes effect."""
    if value:
        return value
    if path is not None:
        return path.read_text().strip() or None
    return None


class Token:
    """A token that follows its file: :meth:`current` re-reads ``path`` when its inode, size
    or mtime changed since the last read. A file that is briefly missing or unreadable (the
    moment of a swap) keeps the last token rather than dropping authentication."""

    def __init__(self, value: str | None = None, path: Path | None = None) -> None:
        self._value = value or None
        self._path = Path(path) if path is not None else None
        self._stamp: tuple[int, int, int] | None = None
        self._cached: str | None = None
        self._lock = threading.Lock()
        if self._value is None and self._path is not None:
            self._cached = read_token(None, self._path)  # a missing file fails at start-up
            self._stamp = self._stat()

    def _stat(self) -> tuple[int, int, int] | None:
        assert self._path is not None
        try:
            st = os.stat(self._path)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def current(self) -> str | None:
        if self._value is not None or self._path is None:
            return self._value
        stamp = self._stat()
        if stamp is None or stamp == self._stamp:
            return self._cached
        with self._lock:
            try:
                fresh = read_token(None, self._path)
            except OSError as exc:
                log.warning("cannot re-read the token file %s: %s", self._path, exc)
                return self._cached
            if fresh != self._cached:
                log.info("token file %s changed: using the new token", self._path)
            self._cached, self._stamp = fresh, stamp
            return self._cached

    def __bool__(self) -> bool:
        return self.current() is not None


__all__ = ["Token", "read_token"]
