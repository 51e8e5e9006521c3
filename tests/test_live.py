"""Live mode: the server, its page, the WebSocket API and its client, pacing and bad input (tiny models, CPU)."""
from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from live_server import ServerThread, free_port
from liveavatar_pack.live.engine import Engine, demo_models
from liveavatar_pack.live.server import make_app

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def engine():
    return Engine(demo_models("64*64"))


@pytest.fixture(scope="module")
def server(engine):
    with ServerThread(make_app(engine)) as srv:
        yield srv


def _get(url: str) -> tuple[int, str, str]:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.status, r.headers.get("Content-Type", ""), r.read().decode("utf-8", "replace")


def test_page_has_a_video_element_and_the_api_reports_settings(server):
    status, kind, body = _get(server.url + "/")
    assert status == 200 and kind.startswith("text/html")
    assert "<video" in body and "/ws" in body and "MediaSource" in body
    import json

    info = json.loads(_get(server.url + "/api/info")[2])
    assert info["latency_floor_ms"] == info["block_ms"] + info["lookahead_ms"] == 480 + 320
    assert info["busy"] is False
    status, kind, _ = _get(server.url + "/reference.png")
    assert kind == "image/png"


def test_cli_live_demo_serves_on_loopback(tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "liveavatar", "live", "--demo", "--size", "64*64", "--port",
                             str(port)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                body = _get(f"http://127.0.0.1:{port}/")[2]
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read()
                assert time.monotonic() < deadline, "live --demo did not start listening"
                time.sleep(0.5)
        assert "<video" in body
        import psutil

        listening = {c.laddr.ip for c in psutil.Process(proc.pid).net_connections() if c.status == "LISTEN"}
        assert listening == {"127.0.0.1"}
    finally:
        proc.terminate()
        proc.wait(30)


def test_cli_live_models_without_image_is_one_line_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "liveavatar", "live", "--models", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == "error: --models needs --image (the default reference image)"
