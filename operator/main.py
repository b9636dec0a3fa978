"""``loramux operator``: parse settings (flags or ``LORAMUX_OPERATOR_*``), then run kopf."""

from __future__ import annotations

import logging
import random

from pydantic_settings import CliApp, SettingsConfigDict

from loramux.operator.settings import ENV_PREFIX, OperatorSettings


class OperatorCli(OperatorSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", cli_prog_name="loramux operator",
        cli_kebab_case=True, cli_implicit_flags=True, cli_avoid_json=True,
    )


def parse(argv: list[str]) -> OperatorSettings:
    parsed = CliApp.run(OperatorCli, cli_args=argv)
    return OperatorSettings.model_validate(parsed.model_dump())


def main(argv: list[str]) -> int:
    settings = parse(argv)
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
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
