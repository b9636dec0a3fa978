"""``loramux push DIR s3://bucket/prefix/<tenant>/<version>/``: publish an adapter version.

The human summary goes to stderr and, with ``--emit-cr``, only the ``LoraAdapter`` YAML goes
to stdout, so ``loramux push ... --emit-cr | kubectl apply -f -`` works. Every expected
failure (bad flags or URI, inconsistent directory, S3 errors, no credentials, unreachable
endpoint) is one line on stderr and exit code 2, never a traceback: this runs in CI pipelines
where the first line of output is all anyone reads.

Flags and ``LORAMUX_PUSH_*`` environment variables fill :class:`PushSettings`
(:func:`loramux.settings_cli.settings_from_cli`, like every ``loramux`` command).
"""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, CliPositionalArg, SettingsConfigDict

from loramux.logs import LogLevel, LogSettings
from loramux.s3 import EndpointUrl

PROG = "loramux push"
EXIT_ERROR = 2


class PushSettings(LogSettings, BaseSettings):
    """Upload a verified adapter directory (with manifest.json) to S3; the manifest is
    uploaded last. Identical re-pushes are no-ops; different content for an existing version
    is refused unless --force."""

    model_config = SettingsConfigDict(env_prefix="LORAMUX_PUSH_", extra="forbid")

    directory: CliPositionalArg[Path] = Field(
        description="adapter directory containing manifest.json")
    uri: CliPositionalArg[str] = Field(description="s3://bucket/[prefix/]<tenant>/<version>/")
    force: bool = Field(False, description="overwrite an existing version with different "
                                           "content")
    emit_cr: bool = Field(False, description="print the LoraAdapter resource (YAML) on stdout")
    endpoint_url: EndpointUrl | None = Field(
        None, description="S3 endpoint (default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL / AWS)")
    namespace: str | None = Field(None, description="metadata.namespace of the emitted CR")
    name: str | None = Field(
        None, description="metadata.name of the emitted CR (default: <tenant>-<version>)")
    progress: bool = Field(True, description="a progress bar on stderr when it is a terminal "
                                             "(--no-progress: never)")
    # stderr carries the summary line; logs only when something is wrong.
    log_level: LogLevel = "warning"


def _fail(message: str) -> int:
    text = " ".join(str(message).split())  # exactly one line, whatever the cause carried
    print(f"{PROG}: error: {text}", file=sys.stderr)
    return EXIT_ERROR


def main(argv: list[str]) -> int:
    """Run ``loramux push``; returns the exit code (0 ok, 2 on any error)."""
    from loramux.logs import configure_logging
    from loramux.settings_cli import settings_from_cli

    try:
        args = settings_from_cli(PushSettings, argv, PROG)
    except SystemExit as exc:  # --help (0), or bad flags (2, the problem already printed)
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    configure_logging(args.log_level, args.log_format)

    try:
        from loramux.names import InvalidName
        from loramux.s3 import S3Credentials, S3Error, make_client
        from loramux.training.publish import PublishError, push, render_cr
    except ImportError as exc:
        return _fail(f"missing dependency ({exc}); install loramux[train]")

    try:
        client = make_client(S3Credentials(endpoint_url=args.endpoint_url))
        result = push(
            args.directory,
            args.uri,
            force=args.force,
            client=client,
            progress=args.progress and sys.stderr.isatty(),
        )
        cr = None
        if args.emit_cr:
            assert result.manifest is not None
            cr = render_cr(
                result.manifest,
                result.uri,
                result.manifest_sha256,
                name=args.name,
                namespace=args.namespace,
            )
    except (PublishError, InvalidName) as exc:
        return _fail(str(exc))
    except S3Error as exc:
        return _fail(f"{args.uri}: {exc.message}")
    except OSError as exc:
        return _fail(f"{exc.strerror or exc}: {exc.filename or args.directory}")

    if result.skipped:
        state = "already published (identical), nothing uploaded"
    elif result.replaced:
        state = "published (replaced different content, --force)"
    else:
        state = "published"
    print(
        f"{result.uri}: {state}; {result.files} files, {result.bytes} bytes, "
        f"manifest sha256 {result.manifest_sha256}",
        file=sys.stderr,
    )
    if cr is not None:
        sys.stdout.write(cr)
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
