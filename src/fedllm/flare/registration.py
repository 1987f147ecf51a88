"""RegistrationMarker: a file in the site's workspace that stays fresh while the site is registered.

A container healthcheck runs outside NVFlare's process and cannot ask it whether the site is part of
the federation. This component, loaded by the site's parent process from its kit's
`local/resources.json`, writes the file when the server has accepted the site's registration (a token
came back) and rewrites it after every heartbeat that left while the site's connection to the server
was up. The healthcheck then reads only the file's age: stale (or absent) means "not registered".
"""

from __future__ import annotations

import time
from pathlib import Path

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.fuel.f3.cellnet.fqcn import FQCN

from fedllm.fileio import write_text

MARKER_NAME = "fedllm_registered"


class RegistrationMarker(FLComponent):
    """Keeps `<workspace>/<file_name>` fresh while this site is registered with the server."""

    def __init__(self, file_name: str = MARKER_NAME):
        super().__init__()
        self.file_name = file_name
        self._path: Path | None = None

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type == EventType.AFTER_CLIENT_REGISTER:
            workspace = fl_ctx.get_prop(FLContextKey.WORKSPACE_OBJECT)
            if workspace is None:
                return
            self._path = Path(workspace.get_root_dir()) / self.file_name
            if fl_ctx.get_prop(FLContextKey.CLIENT_TOKEN):
                self._touch()
        # NVFlare fires AFTER_CLIENT_HEARTBEAT after any heartbeat it did not fail to send, an unreachable
        # server included (the reply only carries an error code): the connection is checked as well.
        elif event_type == EventType.AFTER_CLIENT_HEARTBEAT and self._path is not None and _connected_to_server(fl_ctx):
            self._touch()

    def _touch(self) -> None:
        assert self._path is not None
        write_text(self._path, f"{time.time():.0f}\n")


def _connected_to_server(fl_ctx: FLContext) -> bool:
    engine = fl_ctx.get_engine()
    cell = engine.get_cell() if engine is not None and hasattr(engine, "get_cell") else None
    return bool(cell is not None and cell.is_cell_connected(FQCN.ROOT_SERVER))
