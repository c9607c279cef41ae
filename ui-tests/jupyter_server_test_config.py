"""Jupyter server for the UI test: `make lab`'s settings, plus Galata's test helpers, on a read-only repository.

Like `make lab`: root directory = the repository root, default URL /lab/tree/notebooks, 127.0.0.1, and
--allow-root only when running as root. Galata's `configure_jupyter_server` adds its browser helpers, an empty
token and no XSRF check (test only; never use this configuration for real work). The port is $UI_TEST_PORT
(8890 by default, so that a `make lab` on 8888 can keep running).

The test runs notebooks/02_moe_layer.ipynb in the browser and must leave the repository unchanged. Autosave
is switched off in the test's settings; as a second guard, this server refuses every write through the
contents API (save, rename, delete, checkpoints) with HTTP 403, so a save could fail but never overwrite.
"""
import os
import shutil
import tempfile
from pathlib import Path

from jupyter_server.services.contents.largefilemanager import AsyncLargeFileManager
from jupyterlab.galata import configure_jupyter_server
from tornado.web import HTTPError

REPO = Path(__file__).resolve().parent.parent

# configure_jupyter_server makes temporary directories (a root directory we don't use, workspaces, a bash rc
# file) that nobody removes, as Playwright kills the server at the end. Keep them in one folder, emptied here
# at the start of every run, so at most one run's leftovers stay in the temporary directory.
_scratch = Path(tempfile.gettempdir()) / "moelab-ui-test"
shutil.rmtree(_scratch, ignore_errors=True)
_scratch.mkdir()
tempfile.tempdir = str(_scratch)

configure_jupyter_server(c)  # noqa: F821 (c is the config object jupyter passes in)

c.ServerApp.root_dir = str(REPO)
c.LabApp.default_url = "/lab/tree/notebooks"
c.ServerApp.ip = "127.0.0.1"
c.ServerApp.port = int(os.environ.get("UI_TEST_PORT", "8890"))
c.ServerApp.allow_root = os.geteuid() == 0
c.Application.log_level = os.environ.get("UI_TEST_LOG_LEVEL", "WARN")


class ReadOnlyContentsManager(AsyncLargeFileManager):
    """Serves files as usual, refuses to change any of them."""

    def _refuse(self, what, path):
        raise HTTPError(403, f"UI test server is read-only: refused to {what} {path!r}")

    async def save(self, model, path=""):
        self._refuse("save", path)

    async def delete_file(self, path):
        self._refuse("delete", path)

    async def rename_file(self, old_path, new_path):
        self._refuse("rename", old_path)

    async def create_checkpoint(self, path):
        self._refuse("checkpoint", path)

    async def restore_checkpoint(self, checkpoint_id, path):
        self._refuse("restore a checkpoint of", path)

    async def delete_checkpoint(self, checkpoint_id, path):
        self._refuse("delete a checkpoint of", path)


c.ServerApp.contents_manager_class = ReadOnlyContentsManager
