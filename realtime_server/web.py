"""The browser canvas: the page's own files from web_static/, and its npm dependencies."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

logger = logging.getLogger(__name__)

DEFAULT_STATIC_DIR = Path(__file__).resolve().parent.parent / "web_static"
# Only the page's own top-level files are served; package.json, node_modules and the rest are not.
_PAGE_FILE = re.compile(r"^[a-z][a-z0-9_-]*\.(html|js|css|png|svg|ico)$")
_VENDOR = {"msgpack": Path("node_modules/@msgpack/msgpack/dist.esm")}
_NO_CACHE = {"Cache-Control": "no-cache"}  # revalidate, so a new server version is picked up at once


def web_routes(static_dir: Path = DEFAULT_STATIC_DIR) -> list[BaseRoute]:
    async def page(request: Request) -> Response:
        name = request.path_params.get("name", "index.html")
        if not _PAGE_FILE.match(name) or not (static_dir / name).is_file():
            raise HTTPException(404, f"no such file: {name}")
        return FileResponse(static_dir / name, headers=_NO_CACHE)

    routes: list[BaseRoute] = [Route("/", page), Route("/{name:str}", page)]
    for name, relative in _VENDOR.items():
        directory = static_dir / relative
        if directory.is_dir():
            routes.append(Mount(f"/vendor/{name}", StaticFiles(directory=directory), name=f"vendor-{name}"))
        else:
            logger.warning(
                "the browser page needs %s (npm package); run `make setup` (npm ci in web_static/)", directory
            )
    return routes
