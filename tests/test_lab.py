"""`make lab` serves the notebooks on 127.0.0.1 behind a token, even as root, and stops cleanly."""
import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, wait_s: float = 30.0) -> tuple[int, bytes]:
    """HTTP GET; retries while the port refuses connections (the server prints its URL before it listens)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as err:
            return err.code, b""
        except urllib.error.URLError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.fixture
def lab(tmp_path):
    port = free_port()
    env = {**os.environ, "BROWSER": "true", "JUPYTER_RUNTIME_DIR": str(tmp_path), "JUPYTER_CONFIG_DIR": str(tmp_path)}
    proc = subprocess.Popen(["make", "--no-print-directory", "lab", f"LAB_PORT={port}"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    log, deadline = [], time.monotonic() + 90
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        log.append(line)
        match = re.search(rf"http://127\.0\.0\.1:{port}/lab\?token=(\w+)", line)
        if match:
            break
        if proc.poll() is not None:
            break
    try:
        assert match, "JupyterLab did not print its URL:\n" + "".join(log)
        yield port, match[1]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_make_lab_serves_the_notebooks_behind_a_token(lab):
    port, token = lab
    base = f"http://127.0.0.1:{port}"
    status, body = get(f"{base}/api/contents?token={token}")
    assert status == 200
    names = {item["name"] for item in json.loads(body)["content"]}
    assert {"00_orientation.ipynb", "01_dense_baseline.ipynb"} <= names
    assert get(f"{base}/api/contents")[0] == 403  # no token, no access
    status, body = get(f"{base}/api/kernelspecs?token={token}")
    assert "moelab" in json.loads(body)["kernelspecs"]
