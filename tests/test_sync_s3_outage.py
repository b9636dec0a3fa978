"""S3 goes away in the middle of a download, then comes back: the sidecar converges.

Real processes: moto's S3 server, `loramux serve` (tiny model) and `loramux sync`. Between the
sidecar and moto sits a small TCP relay on loopback that slows the bytes from S3 down to
about 1 MB/s, so a 3 MB adapter takes seconds to arrive. The test closes the relay (listening
socket and every open connection) while the body is flowing - to the sidecar that is S3
vanishing mid-download, connections reset - and later listens again on the same port.
The relay exists because moto answers loopback requests in milliseconds; it changes the
timing, not the bytes.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from moto.server import ThreadedMotoServer

from factories import stage_adapter
from loramux.training.publish import push

EXTRA_BYTES = 3 << 20  # the adapter carries a 3 MB extra file, to be slow to download


class ThrottledRelay:
    """host:port -> moto, downstream throttled; ``stop()`` drops everything, ``start()``
    listens again on the same port."""

    def __init__(self, upstream: tuple[str, int], rate_bytes_s: int) -> None:
        self.upstream, self.rate = upstream, rate_bytes_s
        self.port = 0
        self.sent = 0  # bytes relayed downstream (S3 -> sidecar)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    throttle: bool) -> None:
        try:
            while data := await reader.read(16384):
                writer.write(data)
                await writer.drain()
                if throttle:
                    self.sent += len(data)
                    await asyncio.sleep(len(data) / self.rate)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        self._writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer, False),
                             self._pipe(up_reader, writer, True))

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port,
                                                  reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()  # reset, not a graceful end of the body
        self._writers.clear()
        await self._server.wait_closed()

    def start(self) -> None:
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(10)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def moto_server() -> Iterator[ThreadedMotoServer]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    yield server
    server.stop()


def test_s3_lost_mid_download_then_back_converges(
    moto_server: ThreadedMotoServer, start_server, start_sidecar, tiny_model_dir: Path,
    adapter_root: Path, tmp_path: Path,
) -> None:
    host, port = moto_server.get_host_and_port()
    creds = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
             "AWS_REGION": "us-east-1"}
    s3 = boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1",
                      aws_access_key_id="test", aws_secret_access_key="test")
    s3.create_bucket(Bucket="outage")
    src, _ = stage_adapter(adapter_root, tmp_path, "legal", "v1",
                           extra={"notes.txt": os.urandom(EXTRA_BYTES)})
    pushed = push(src, "s3://outage/legal/v1/", client=s3, progress=False)

    relay = ThrottledRelay((host, port), rate_bytes_s=1 << 20)
    relay.start()
    root = tmp_path / "volume"
    server = start_server("--model", str(tiny_model_dir), "--quantization", "none",
                          "--log-format", "text")
    sidecar = start_sidecar(
        "--root", str(root), "--server-url", server.url, "--resync-seconds", "0.5",
        "--backoff-seconds", "0.3", "--retries", "8", "--log-level", "debug",
        env={**creds, "AWS_ENDPOINT_URL": relay.endpoint})

    def state() -> dict[str, Any]:
        items = httpx.get(f"{sidecar.url}/v1/state", timeout=5).json()["adapters"]
        return items[0] if items else {}

    r = httpx.put(f"{sidecar.url}/v1/desired", timeout=5, json={"adapters": [
        {"tenant": "legal", "version": "v1", "uri": "s3://outage/legal/v1/",
         "sha256": pushed.manifest_sha256}]})
    assert r.status_code == 202, r.text

    deadline = time.monotonic() + 30
    while relay.sent < 600_000:  # well into the 3 MB body
        assert time.monotonic() < deadline, f"download did not start ({relay.sent} bytes)"
        time.sleep(0.05)
    assert state()["phase"] == "Downloading"
    relay.stop()  # S3 vanishes mid-body
    outage_started = time.monotonic()
    try:
        deadline = time.monotonic() + 30
        while state().get("code") != "io_error":
            assert time.monotonic() < deadline, state()
            time.sleep(0.1)
        assert state()["phase"] in ("Pending", "Downloading", "Failed")
        # nothing partial is visible, and the server holds nothing
        assert not (root / "legal" / "v1").exists()
        listing = httpx.get(f"{server.url}/admin/adapters", timeout=5).json()["adapters"]
        assert listing == []
        time.sleep(max(0.0, 1.5 - (time.monotonic() - outage_started)))  # a few failed tries
    finally:
        relay.rate = 64 << 20
        relay.start()
    deadline = time.monotonic() + 60
    while state().get("phase") != "Ready":
        assert time.monotonic() < deadline, state()
        time.sleep(0.1)
    final = state()
    assert final["digest"] == pushed.manifest_sha256
    assert final["timings"]["attempts"] >= 2
    # the first failure was the body breaking off, the later ones the endpoint being gone
    failures = [line for line in sidecar.log().splitlines()
                if "fetch of legal@v1 failed (io_error)" in line]
    assert len(failures) >= 2, sidecar.log()[-3000:]
    assert "reading notes.txt" in failures[0], failures[0]  # broke off inside the 3 MB file
    assert any("Could not connect" in line for line in failures[1:]), failures
    assert (root / "legal" / "v1" / "notes.txt").read_bytes() == (src / "notes.txt").read_bytes()
    assert not any((root / ".incoming").glob("*")) if (root / ".incoming").exists() else True
    out = httpx.post(f"{server.url}/generate", timeout=60, json={
        "tenant_id": "legal", "prompt": "hello", "max_new_tokens": 4})
    assert out.status_code == 200 and out.json()["adapter"] == "legal@v1"
    relay.stop()
