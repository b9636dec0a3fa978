"""The ``loramux`` command. Each subcommand imports only what it needs, so the operator
image never loads torch.

Flags and ``LORAMUX_*`` environment variables both fill one typed settings object per
process (pydantic-settings parses both, through :func:`loramux.settings_cli.settings_from_cli`),
and every process logs through :func:`loramux.logs.configure_logging`.
"""

from __future__ import annotations

import importlib
import sys

USAGE = """usage: loramux <command> [flags]

commands:
  serve       run the inference server (one base model, many tenants' adapters)
  sync        run the adapter-sync sidecar (pulls adapter versions from S3 into the pod)
  train       train one or several tenants' LoRA adapters on one frozen base (QLoRA)
  push        publish a trained adapter version to S3 (manifest last), optionally print its CR
  fetch       download and verify one adapter version into a volume, then exit (init containers)
  operator    run the Kubernetes operator (LoraAdapter resources -> pods' sidecars; kopf)
  version     print the version

Run 'loramux <command> --help' for its flags.
"""


def _serve(argv: list[str]) -> int:
    from loramux.inference.settings import ServeSettings
    from loramux.settings_cli import settings_from_cli

    settings = settings_from_cli(ServeSettings, argv, "loramux serve")
    from loramux.inference.access import AccessFileError
    from loramux.inference.cpu_linear import CpuLinearError
    from loramux.inference.model_loader import ModelLoadError
    from loramux.inference.server import serve

    try:
        serve(settings)
    except (ModelLoadError, AccessFileError, CpuLinearError) as exc:  # a missing model, a bad
        # access file, an impossible precision or linear path: say it once
        print(f"loramux serve: {exc}", file=sys.stderr)
        return 2
    return 0


# Each command's entry point, imported only when it runs (the operator image has no torch).
COMMANDS = {
    "serve": "loramux.cli:_serve",
    "sync": "loramux.sync.cli:main",
    "train": "loramux.training.cli_train:main",
    "push": "loramux.training.cli_push:main",
    "fetch": "loramux.inference.fetch_cli:main",
    "operator": "loramux.operator.main:main",
}


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = args[0], args[1:]
    if command == "version":
        from loramux import __version__

        print(__version__)
        return 0
    if command not in COMMANDS:
        print(f"loramux: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    module, _, function = COMMANDS[command].partition(":")
    return getattr(importlib.import_module(module), function)(rest)

if __name__ == "__main__":
    sys.exit(main())
