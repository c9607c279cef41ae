"""`make lab` serves the repository on 127.0.0.1 behind a token, opens at notebooks/, runs as root too."""
import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow            # spawns ranks, runs JupyterLab or installs: not in make test-fast

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


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM make's whole process group (make and jupyter), then SIGKILL whatever is left after 15 s."""
    for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            proc.poll()  # reap make, so that a zombie leader does not keep the group alive
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


@pytest.fixture
def lab(tmp_path):
    port = free_port()
    env = {**os.environ, "BROWSER": "true", "JUPYTER_RUNTIME_DIR": str(tmp_path), "JUPYTER_CONFIG_DIR": str(tmp_path)}
    log = tmp_path / "lab.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(["make", "--no-print-directory", "lab", f"LAB_PORT={port}"], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, match = time.monotonic() + 120, None
        while match is None and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
            match = re.search(rf"http://127\.0\.0\.1:{port}/\S*\?token=(\w+)", log.read_text())
        assert match, "JupyterLab did not print its URL:\n" + log.read_text()
        yield port, match[1]
    finally:
        stop_group(proc)


def test_make_lab_serves_the_notebooks_behind_a_token(lab):
    port, token = lab
    base = f"http://127.0.0.1:{port}"
    status, body = get(f"{base}/api/contents/notebooks?token={token}")
    assert status == 200
    names = {item["name"] for item in json.loads(body)["content"]}
    assert {"00_orientation.ipynb", "01_dense_baseline.ipynb"} <= names
    assert get(f"{base}/api/contents/src/moelab/corpus/README.md?token={token}")[0] == 200  # files notebooks cite
    assert get(f"{base}/api/contents")[0] == 403  # no token, no access
    request = urllib.request.Request(f"{base}/?token={token}")
    opener = urllib.request.build_opener(NoRedirect)
    with pytest.raises(urllib.error.HTTPError) as redirect:                # NoRedirect turns the 302 into an error
        opener.open(request, timeout=5)
    assert redirect.value.code == 302
    assert urllib.parse.urlparse(redirect.value.headers["Location"]).path == "/lab/tree/notebooks"
    status, body = get(f"{base}/api/kernelspecs?token={token}")
    assert "moelab" in json.loads(body)["kernelspecs"]
