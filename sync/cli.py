"""``loramux sync``: parse flags and ``LORAMUX_SYNC_*`` into :class:`SyncSettings`, set up the
logs, and serve the sidecar's API (the reconcile loop runs in its lifespan)."""

from __future__ import annotations

PROG = "loramux sync"


def main(argv: list[str]) -> int:
    from loramux.logs import configure_logging
    from loramux.settings_cli import settings_from_cli
    from loramux.sync.settings import SyncSettings

    settings = settings_from_cli(SyncSettings, argv, PROG)
    configure_logging(settings.log_level, settings.log_format)

    import uvicorn

    from loramux.sync.app import create_app

    # log_config=None: uvicorn's loggers go through the handler configure_logging set up.
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                log_config=None, log_level=settings.log_level)
    return 0


__all__ = ["main"]
