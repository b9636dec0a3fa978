"""The shared pieces every process uses: the wire contracts, the S3 retry policy, the
settings-to-CLI helper and the log set-up."""

from __future__ import annotations

import json
import logging

import pytest
from pydantic import ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from loramux.contracts import (
    AdapterList,
    AdapterState,
    DesiredAdapter,
    DesiredState,
    ErrorBody,
    PlacementState,
    SyncPhase,
    SyncState,
    error_body,
    parse_error,
)
from loramux.logs import JsonFormatter, LogSettings, configure_logging
from loramux.s3 import (
    RetryPolicy,
    S3Error,
    bucket_problem,
    credentials_from_values,
    endpoint_problem,
    parse_s3_uri,
)
from loramux.settings_cli import settings_from_cli


def test_desired_state_survives_the_wire_with_its_credentials():
    sent = DesiredState(adapters=[
        DesiredAdapter(tenant="acme", version="v2", uri="s3://bucket/acme/v2/", active=True,
                       sha256="a" * 64,
                       credentials={"access_key_id": "AKIA", "secret_access_key": "s3cr3t",
                                    "region": "eu-west-1"}),
        DesiredAdapter(tenant="acme", version="v1", uri="s3://bucket/acme/v1/"),
    ])
    wire = json.loads(json.dumps(sent.wire()))
    received = DesiredState.model_validate(wire)
    assert received == sent
    assert received.adapters[0].credentials.to_s3().secret_access_key == "s3cr3t"
    # Unset optional fields are left out rather than sent as null.
    assert "sha256" not in wire["adapters"][1] and "route" not in wire["adapters"][1]
    # The view for humans never carries a secret.
    assert "s3cr3t" not in json.dumps(received.adapters[0].public_view())


def test_desired_state_refuses_two_active_versions_of_one_tenant():
    with pytest.raises(ValidationError, match="more than one active version"):
        DesiredState.model_validate({"adapters": [
            {"tenant": "a", "version": "v1", "uri": "file:///x", "active": True},
            {"tenant": "a", "version": "v2", "uri": "file:///y", "active": True}]})


def test_reports_tolerate_fields_a_newer_peer_adds():
    state = SyncState.model_validate({
        "adapters": [{"tenant": "a", "version": "v1", "phase": "Ready", "new_field": 1}],
        "server": {"adapters": [{"tenant": "a", "version": "v1", "state": "ready",
                                 "active": True, "something_new": "x"}],
                   "base_model": "smollm2-135m", "base_model_aliases": ["base"]},
        "unknown_top_level": True})
    assert state.adapters[0].phase is SyncPhase.READY
    assert state.server is not None
    assert state.server.adapters[0].state is AdapterState.READY
    assert state.server.base_names == frozenset({"smollm2-135m", "base"})
    assert AdapterList().base_names is None


def test_one_error_body_and_a_tolerant_reader():
    body = error_body(404, "model_not_found", "no adapter for x")
    assert ErrorBody.model_validate(body).error.status == 404
    assert parse_error(body) == ("model_not_found", "no adapter for x")
    assert parse_error({"detail": "not ours"}, "http_error", "raw") == ("http_error", "raw")
    assert parse_error("not even a dict") == ("http_error", "")


def test_placement_state_is_the_sync_phases_and_unknown():
    assert {p.value for p in PlacementState} == {p.value for p in SyncPhase} | {"Unknown"}


@pytest.mark.parametrize(("code", "retryable", "attempt", "verdict"), [
    ("io_error", True, 0, "retry"),
    ("io_error", True, 4, "later"),  # the last attempt of 5: a later pass tries again
    ("not_found", False, 0, "retry"),  # an upload may still be under way (manifest last)
    ("disk_budget", False, 0, "later"),
    ("access_denied", False, 0, "give_up"),
    ("digest_mismatch", False, 0, "give_up"),
])
def test_one_retry_policy(code, retryable, attempt, verdict):
    policy = RetryPolicy(retries=4, backoff_seconds=0.5)
    assert policy.verdict(S3Error(code, "x", retryable=retryable), attempt) == verdict


def test_retry_delays_grow_with_jitter():
    policy = RetryPolicy(retries=3, backoff_seconds=1.0)
    for attempt in range(3):
        assert 2**attempt <= policy.delay(attempt) <= 1.5 * 2**attempt
    assert RetryPolicy(backoff_seconds=0).delay(2) == 0


def test_s3_validation_in_one_place():
    assert parse_s3_uri("s3://my-bucket/a/b/").prefix == "a/b"
    assert str(parse_s3_uri("s3://my-bucket/a/b")) == "s3://my-bucket/a/b/"
    for bad in ("s3://Bad_Bucket/x", "s3://b/x", "s3://bucket/a/../b", "s3://bucket/x?y",
                "https://bucket/x", "s3://192.168.1.1/x"):
        with pytest.raises(S3Error) as err:
            parse_s3_uri(bad)
        assert err.value.code == "bad_uri"
    assert bucket_problem("xn--bucket") is not None
    assert endpoint_problem("http://user:pw@minio:9000") is not None
    assert endpoint_problem("http://minio.storage:9000") is None
    creds, problem = credentials_from_values(
        {"AWS_ACCESS_KEY_ID": "AK\n", "AWS_SECRET_ACCESS_KEY": "SK", "AWS_REGION": "us-east-1"},
        "s3")
    assert problem is None and creds == {"access_key_id": "AK", "secret_access_key": "SK",
                                         "region": "us-east-1"}
    creds, problem = credentials_from_values({"AWS_ACCESS_KEY_ID": "AK"}, "s3")
    assert creds is None and "AWS_SECRET_ACCESS_KEY" in problem and "AK" not in problem


class _Demo(LogSettings, BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORAMUX_DEMO_", extra="forbid")

    port: int = 8000
    pinned: bool = False
    name: str | None = None


def test_flags_and_environment_fill_one_settings_object(monkeypatch, capsys):
    monkeypatch.setenv("LORAMUX_DEMO_PORT", "9001")
    from_env = settings_from_cli(_Demo, [], "loramux demo")
    assert (from_env.port, from_env.log_format) == (9001, "json")
    from_flags = settings_from_cli(_Demo, ["--port", "9002", "--pinned", "--log-format", "text",
                                           "--name", "x"], "loramux demo")
    assert (from_flags.port, from_flags.pinned, from_flags.log_format, from_flags.name) == (
        9002, True, "text", "x")
    assert type(from_flags) is _Demo
    with pytest.raises(SystemExit) as exit_:
        settings_from_cli(_Demo, ["--port", "eighty"], "loramux demo")
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("loramux demo: invalid arguments: port") and "Traceback" not in err


def test_json_logs_carry_tenant_and_version(capsys):
    configure_logging("info", "json")
    try:
        logging.getLogger("loramux.test").info("adapter ready",
                                               extra={"tenant": "acme", "version": "v1"})
        logging.getLogger("botocore.endpoint").debug("headers with a session token")
        line = capsys.readouterr().err.strip().splitlines()[-1]
        record = json.loads(line)
        assert (record["msg"], record["tenant"], record["version"]) == ("adapter ready",
                                                                          "acme", "v1")
        assert "session token" not in line
        configure_logging("info", "text")
        assert not isinstance(logging.getLogger().handlers[0].formatter, JsonFormatter)
    finally:
        logging.getLogger().handlers.clear()
        logging.getLogger().setLevel(logging.WARNING)


def _sources() -> dict[str, str]:
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    return {str(p.relative_to(root)): p.read_text()
            for folder in ("loramux", "inference", "sync", "operator", "training")
            for p in (root / folder).rglob("*.py")}


@pytest.mark.parametrize(("what", "pattern", "home"), [
    ("the AWS key map", r'"AWS_SESSION_TOKEN"', {"loramux/s3.py"}),
    ("the bucket naming rule", r"a-z0-9\]\[a-z0-9\.-\]\{1,61\}", {"loramux/s3.py"}),
    ("the S3 client factory", r"boto3\.session", {"loramux/s3.py"}),
    ("the retry backoff", r"backoff_seconds \*", {"loramux/s3.py"}),
    ("the wire models", r"^class (DesiredAdapter|DesiredState|EntryCredentials|SyncState)\b",
     {"loramux/contracts.py"}),
    ("the sidecar's phase words", r'"Downloading"', {"loramux/contracts.py"}),
    ("the error body", r'\{"error": \{"\w+": ', set()),  # contracts.error_body builds it
    ("parsing flags", r"CliApp\.run|argparse\.ArgumentParser\(", {"loramux/settings_cli.py"}),
    ("setting up logs", r"basicConfig|\.setFormatter\(", {"loramux/logs.py"}),
    ("the Kubernetes client's private call", r"kube\._call", set()),
])
def test_each_decision_has_one_home(what, pattern, home):
    """The copies the contracts issue removed stay removed: each lives in one module."""
    import re

    found = {path for path, text in _sources().items() if re.search(pattern, text, re.M)}
    assert found <= home, f"{what} is written again in {sorted(found - home)}"


@pytest.mark.parametrize("bad", ["acme\n", "acme\r\n", "ac\nme", "acme ", "\nacme"])
def test_names_with_newlines_are_refused_everywhere(bad):
    """A `$`-anchored regex lets a trailing newline through; every validator matches whole."""
    from loramux.names import InvalidName, TenantRef, validate_label
    from loramux.operator.model import parse_adapter

    with pytest.raises(InvalidName):
        validate_label(bad)
    with pytest.raises(InvalidName):
        TenantRef.parse(f"{bad}@v1")
    with pytest.raises(ValidationError):
        DesiredAdapter(tenant=bad, version="v1", uri="file:///x")
    assert bucket_problem(f"bucket{bad}") is not None
    spec = parse_adapter({"metadata": {"name": "a", "namespace": "ns"},
                          "spec": {"tenant": "acme", "version": "v1", "baseModel": "m",
                                   "pool": {"matchLabels": {"app": "x"}},
                                   "source": {"uri": "s3://bucket/acme/v1/",
                                              "credentialsSecret": f"s3{bad}"}}})
    assert spec.error is not None and "credentialsSecret" in spec.error
