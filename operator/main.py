"""``loramux operator``: parse settings (flags or ``LORAMUX_OPERATOR_*``), then run kopf."""

from __future__ import annotations

import random

from loramux.logs import configure_logging
from loramux.operator.settings import OperatorSettings
from loramux.settings_cli import settings_from_cli


def parse(argv: list[str]) -> OperatorSettings:
    return settings_from_cli(OperatorSettings, argv, "loramux operator")


def main(argv: list[str]) -> int:
    settings = parse(argv)
    configure_logging(settings.log_level, settings.log_format)
    import kopf

    from loramux.operator import handlers

    if settings.priority is None:
        # Equal priorities make every replica pause; a random one elects exactly one. The
        # reconcile loop reads it too, to stand by while a higher-priority replica lives.
        settings = settings.model_copy(update={"priority": random.randint(1, 2**31 - 1)})
    handlers.configure(settings)
    liveness = (f"http://0.0.0.0:{settings.health_port}/healthz"
                if settings.health_port else None)
    kopf.run(
        clusterwide=settings.namespace is None,
        namespaces=[settings.namespace] if settings.namespace else (),
        standalone=settings.peering is None,
        peering_name=settings.peering,
        priority=settings.priority,
        liveness_endpoint=liveness,
    )
    return 0
