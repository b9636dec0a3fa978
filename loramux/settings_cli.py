"""One way to turn a command line into a process's settings.

Every ``loramux`` command has one typed settings object (pydantic-settings): its flags and
its ``LORAMUX_*`` environment variables fill the same fields, flags winning. This helper
derives the command-line parser from the settings class, so no command repeats the parser
configuration, and turns bad input into one line on stderr and exit code 2.
"""

from __future__ import annotations

import sys
from typing import TypeVar

from pydantic import ValidationError
from pydantic_settings import BaseSettings, CliApp, SettingsConfigDict

S = TypeVar("S", bound=BaseSettings)
EXIT_USAGE = 2


class UsageError(SystemExit):
    """Bad flags or environment: the message is printed, the exit code is 2."""

    def __init__(self, prog: str, message: str) -> None:
        print(f"{prog}: {message}", file=sys.stderr)
        super().__init__(EXIT_USAGE)


def describe_validation_error(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'input'}: {e['msg']}"
                     for e in exc.errors())


def settings_from_cli(cls: type[S], argv: list[str], prog: str) -> S:
    """``cls`` filled from ``argv`` (kebab-case flags, ``--flag``/``--no-flag`` booleans)
    and the environment. ``--help`` prints and exits 0; invalid input exits 2 with a
    one-line reason (:class:`UsageError`)."""
    config = SettingsConfigDict(**{**cls.model_config, "cli_prog_name": prog,
                                   "cli_kebab_case": True, "cli_implicit_flags": True,
                                   "cli_avoid_json": True, "cli_hide_none_type": True})
    cli_cls = type(f"{cls.__name__}Cli", (cls,), {"model_config": config,
                                                   "__module__": cls.__module__,
                                                   "__doc__": cls.__doc__})
    try:
        parsed = CliApp.run(cli_cls, cli_args=argv)
        return cls.model_validate(parsed.model_dump())
    except ValidationError as exc:
        raise UsageError(prog, f"invalid arguments: {describe_validation_error(exc)}") from None
