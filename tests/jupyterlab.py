"""A JupyterLab server of this environment for the tests, on loopback with a token of its own.

Its configuration, runtime, data, settings and workspace folders are temporary, so neither the
user's Jupyter set-up (a `python3` kernelspec of another environment, saved layouts) nor an
earlier run changes what it shows. It inherits the test's environment, so its kernels talk to
the loopback S3 server.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from xraylib import locals3

# Settings a person would answer once: no "fetch Jupyter news?" toast, no update check (offline).
SETTINGS = {"@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                               "checkForUpdates": False}}


@dataclass
class LabServer:
    url: str  # http://127.0.0.1:PORT
    token: str
    root: Path
    log: Path  # the server's stdout and stderr

    def get(self, path: str) -> dict:
        request = urllib.request.Request(self.url + path, headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def page_url(self, path: str) -> str:
        """The address a browser opens, token included (`?reset` starts from an empty layout)."""
        return f"{self.url}/lab/tree/{path}?reset&token={self.token}"


@contextlib.contextmanager
def jupyter_lab(root: Path, home: Path, *, args: Sequence[str] = (), env: dict[str, str] | None = None,
                timeout: float = 120) -> Iterator[LabServer]:
    """Run `jupyter lab` on `root` for the block; `home` holds its private folders and its log."""
    home.mkdir(parents=True, exist_ok=True)
    settings = home / "settings"
    for name, values in SETTINGS.items():
        (settings / name).parent.mkdir(parents=True, exist_ok=True)
        (settings / name).write_text(json.dumps(values))
    token = uuid.uuid4().hex
    port = locals3.free_port()
    env = {**os.environ, **(env or {}), "JUPYTER_RUNTIME_DIR": str(home / "runtime"), "JUPYTER_CONFIG_DIR": str(home / "config"),
           "JUPYTER_DATA_DIR": str(home / "data"), "JUPYTERLAB_SETTINGS_DIR": str(settings),
           "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces")}
    jupyter = Path(sys.executable).parent / "jupyter"
    log = home / "jupyter-lab.log"
    with log.open("wb") as log_file:
        server = subprocess.Popen(
            [str(jupyter), "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}", f"--IdentityProvider.token={token}",
             f"--ServerApp.root_dir={root}", "--ServerApp.port_retries=0", *(["--allow-root"] if os.geteuid() == 0 else []),
             *args],
            stdout=log_file, stderr=subprocess.STDOUT, env=env,
        )
    lab = LabServer(f"http://127.0.0.1:{port}", token, root, log)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"JupyterLab exited at start:\n{log.read_text(errors='replace')[-3000:]}")
            try:
                lab.get("/api/status")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"JupyterLab did not answer within {timeout:.0f} s") from None
                time.sleep(0.5)
        yield lab
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
