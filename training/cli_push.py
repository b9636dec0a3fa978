"""``loramux push DIR s3://bucket/prefix/<tenant>/<version>/``: publish an adapter version.

The human summary goes to stderr and, with ``--emit-cr``, only the ``LoraAdapter`` YAML goes
to stdout, so ``loramux push ... --emit-cr | kubectl apply -f -`` works. Every expected
failure (bad URI, inconsistent directory, S3 errors, no credentials, unreachable endpoint)
is one line on stderr and exit code 2, never a traceback: this runs in CI pipelines where
the first line of output is all anyone reads.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROG = "loramux push"
EXIT_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Upload a verified adapter directory (with manifest.json) to S3; the "
        "manifest is uploaded last. Identical re-pushes are no-ops; different content for "
        "an existing version is refused unless --force.",
    )
    parser.add_argument("directory", type=Path, help="adapter directory containing manifest.json")
    parser.add_argument("uri", help="s3://bucket/[prefix/]<tenant>/<version>/")
    parser.add_argument(
        "--force", action="store_true", help="overwrite an existing version with different content"
    )
    parser.add_argument(
        "--emit-cr", action="store_true", help="print the LoraAdapter resource (YAML) on stdout"
    )
    parser.add_argument(
        "--endpoint-url",
        default=None,
        help="S3 endpoint (default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL / AWS)",
    )
    parser.add_argument("--namespace", default=None, help="metadata.namespace of the emitted CR")
    parser.add_argument(
        "--name", default=None, help="metadata.name of the emitted CR (default: <tenant>-<version>)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _fail(message: str) -> int:
    text = " ".join(str(message).split())  # exactly one line, whatever the cause carried
    print(f"{PROG}: error: {text}", file=sys.stderr)
    return EXIT_ERROR


def main(argv: list[str]) -> int:
    """Run ``loramux push``; returns the exit code (0 ok, 2 on any error)."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse already printed usage and the problem
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR

    try:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        from loramux.names import InvalidName
        from loramux.training.publish import (
            PublishError,
            describe_s3_error,
            make_client,
            push,
            render_cr,
        )
    except ImportError as exc:
        return _fail(f"missing dependency ({exc}); install loramux[train]")

    try:
        client = make_client(args.endpoint_url)
        result = push(
            args.directory,
            args.uri,
            force=args.force,
            client=client,
            progress=not args.no_progress and sys.stderr.isatty(),
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
    except (ClientError, BotoCoreError, Boto3Error) as exc:
        return _fail(f"{args.uri}: {describe_s3_error(exc)}")
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
