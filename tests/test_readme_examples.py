"""The README's curl examples work as written, against a real ``loramux serve``.

The commands are read from the docs' ```bash blocks (never copied here): the server is
started with the README's own ``loramux serve`` flags (only the port, and the adapter paths,
which point at adapters trained for the tiny test model, are changed), and each
``curl ... localhost:8000/...`` line is run with the real curl binary, with only the host and
port rewritten. Every one must answer 200 with a sensible body. The port-forwarded examples
of the Kubernetes sections are run too: behind the port-forward it is the same API.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from itertools import pairwise
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from conftest import TENANTS

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", REPO / "docs" / "deploy.md"]
CURL = "/usr/bin/curl"
README_HOST = "localhost:8000"

_BLOCK = re.compile(r"^```(?:bash|sh|shell)[ \t]*\n(.*?)^```", re.MULTILINE | re.DOTALL)


def shell_commands(path: Path) -> list[list[str]]:
    """The commands of a Markdown file's shell blocks, continuation lines joined, comments
    and blank lines dropped, each split as the shell would (no expansion)."""
    commands = []
    for block in _BLOCK.findall(path.read_text(encoding="utf-8")):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv:
                commands.append(argv)
    return commands


def _curls() -> list:
    params = []
    for path in DOCS:
        found = [argv for argv in shell_commands(path)
                 if argv[0] == "curl" and any(README_HOST in arg for arg in argv)]
        params += [pytest.param(argv, id=f"{path.name}:{i}:{_url_path(argv)}")
                   for i, argv in enumerate(found, start=1)]
    return params


def _url_path(argv: list[str]) -> str:
    url = next(arg for arg in argv if README_HOST in arg)
    return urlsplit(url if "://" in url else f"http://{url}").path


def _data(argv: list[str]) -> dict | None:
    for flag, value in pairwise(argv):
        if flag in ("-d", "--data", "--data-raw", "--data-binary"):
            return json.loads(value)
    return None


CURLS = _curls()


def test_the_readme_has_the_public_api_curl_examples():
    readme = [p.values[0] for p in CURLS if p.id.startswith("README.md:")]
    paths = {_url_path(argv) for argv in readme}
    assert {"/generate", "/v1/chat/completions"} <= paths, paths


@pytest.fixture(scope="module")
def readme_server(start_server, tiny_model_dir: Path, adapter_root: Path):
    """The README's ``loramux serve`` command, on the tiny model with test adapters."""
    serve = [argv for argv in shell_commands(REPO / "README.md")
             if argv[:2] == [".venv/bin/loramux", "serve"]]
    assert len(serve) == 1, serve
    args, flags = serve[0][2:], []
    while args:
        flag = args.pop(0)
        if flag == "--port":
            args.pop(0)  # the test server takes a free port
        elif flag == "--adapter":
            ref = args.pop(0).partition("=")[0]
            tenant, _, version = ref.partition("@")
            assert tenant in TENANTS, f"README serves {ref}; tests have adapters for {TENANTS}"
            flags += [flag, f"{ref}={adapter_root / tenant / version}"]
        else:
            flags.append(flag)
    return start_server("--model", str(tiny_model_dir), "--quantization", "none",
                        "--log-format", "text", *flags)


def _run(argv: list[str], url: str) -> tuple[int, str]:
    host = urlsplit(url).netloc
    command = [CURL, *(arg.replace(README_HOST, host) for arg in argv[1:]),
               "--silent", "--show-error", "--write-out", "\n%{http_code}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, f"{shlex.join(command)}: {done.stderr}"
    body, _, status = done.stdout.rpartition("\n")
    return int(status), body


def _check_stream(path: str, body: str) -> None:
    lines = [line for line in body.splitlines() if line]
    assert lines and all(line.startswith("data: ") for line in lines), body[:2000]
    assert lines[-1] == "data: [DONE]", body[-2000:]
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert events and not any("error" in event for event in events), body[:2000]
    if path == "/generate":
        assert "".join(e.get("text", "") for e in events[:-1])
        assert events[-1]["finish_reason"] in ("stop", "length")
        return
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    if path == "/v1/chat/completions":
        assert events[0]["choices"][0]["delta"]["role"] == "assistant"
        assert "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    else:
        assert "".join(e["choices"][0]["text"] for e in events)


def _check_json(path: str, data: dict | None, body: str) -> None:
    answer = json.loads(body)
    assert "error" not in answer, answer
    if path == "/generate":
        assert data is not None
        assert answer["tenant_id"] == data["tenant_id"]
        assert answer["adapter"] == f"{data['tenant_id']}@v1"
        assert answer["text"] and answer["finish_reason"] in ("stop", "length")
        assert 0 < answer["usage"]["completion_tokens"] <= data.get("max_new_tokens", 10**6)
    elif path in ("/v1/completions", "/v1/chat/completions"):
        assert data is not None
        tenant = data["model"].partition("@")[0]
        assert answer["adapter"] == f"{tenant}@v1"
        choice = answer["choices"][0]
        text = choice["message"]["content"] if "message" in choice else choice["text"]
        assert text and choice["finish_reason"] in ("stop", "length")
    elif path == "/v1/models":
        ids = {model["id"] for model in answer["data"]}
        assert {"legal", "medical"} <= ids, ids
    else:
        raise AssertionError(f"no check for {path}: add one to this test")


@pytest.mark.parametrize("argv", CURLS)
def test_doc_curl_example_answers_200(readme_server, argv):
    path, data = _url_path(argv), _data(argv)
    status, body = _run(argv, readme_server.url)
    assert status == 200, f"{shlex.join(argv)} -> {status}: {body[:2000]}"
    if data is not None and data.get("stream"):
        _check_stream(path, body)
    else:
        _check_json(path, data, body)
