"""One way to set up a process's logs: JSON by default (one object a line, with every
``extra`` field, tenant and version among them), plain text with ``--log-format text``.

Every loramux command (serve, sync, fetch, operator, train, push) calls
:func:`configure_logging` once, from the ``log_level``/``log_format`` of its settings
(:class:`LogSettings`).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Literal

from pydantic import BaseModel

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
# kopf's per-object loggers attach their whole settings object and a posting flag to every
# record; the object reference (k8s_ref) is worth keeping, those two are not.
_SKIP = _STANDARD | {"settings", "k8s_skip"}
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
# Their debug logs print request headers, session tokens included: never below INFO.
_CHATTY = ("botocore", "boto3", "s3transfer", "urllib3")

LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["json", "text"]


class LogSettings(BaseModel):
    """The logging fields every command's settings carry (``--log-level``, ``--log-format``)."""

    log_level: LogLevel = "info"
    log_format: LogFormat = "json"


class JsonFormatter(logging.Formatter):
    # Hand-written rather than python-json-logger: 15 lines, and one dependency fewer in the
    # operator image.
    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        payload.update({k: v for k, v in vars(record).items() if k not in _SKIP})
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


def configure_logging(level: str = "info", fmt: str = "json") -> None:
    """Route every logger (uvicorn's and kopf's too) to one stderr handler."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    # On the handler too: a library that sets its own logger's level (werkzeug) stays quiet.
    handler.setLevel(level.upper())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("loramux").setLevel(level.upper())
    for name in _CHATTY:
        logging.getLogger(name).setLevel(max(logging.INFO, root.level))
