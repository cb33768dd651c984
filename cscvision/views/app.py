"""The viewer's HTTP routes (FastAPI). Ids in URLs are looked up, never joined to paths."""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any

from cscvision.views.server import (
    STATIC,
    Catalogue,
    ViewerError,
    jpeg_bytes,
    map_tile,
    png_bytes,
)

LOG = logging.getLogger("cscvision.view")

TILE_FORMATS = {"jpeg": ("image/jpeg", jpeg_bytes), "png": ("image/png", png_bytes)}


def create_app(catalogue: Catalogue) -> Any:
    from fastapi import FastAPI, HTTPException, Query, Response
    from fastapi.responses import FileResponse
    from fastapi.staticfiles import StaticFiles

    app = FastAPI(title="cscvision viewer", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.catalogue = catalogue
    app.state.requests = deque(maxlen=2000)  # recent tile requests, for tests and debugging
    lock = threading.Lock()

    def entry(sid: str):
        if sid not in catalogue.slides:
            raise HTTPException(404, f"no slide {sid!r} in {catalogue.out_dir}")
        return catalogue.slides[sid]

    def target_of(sid: str, target: str) -> str:
        entry(sid)  # an unknown slide is a 404 before its maps are read
        if target not in catalogue.maps(sid).layers:
            raise HTTPException(404, f"slide {sid!r} has no target {target!r}")
        return target

    @app.middleware("http")
    async def one_line_errors(request, call_next):
        """A failing request is a 500 with one log line, never a traceback in the log."""
        from fastapi.responses import PlainTextResponse

        try:
            return await call_next(request)
        except Exception as e:  # every request error ends here, whatever raised it
            LOG.error("%s %s: 500 %s: %s", request.method, request.url.path,
                      type(e).__name__, e)  # fmt: skip
            return PlainTextResponse(f"500 {type(e).__name__}: {e}", status_code=500)

    def open_slide_dz(sid: str) -> Any:
        try:
            return catalogue.slide_dz(sid)
        except ViewerError as e:  # slide moved or unreadable: the maps still show
            LOG.warning("%s", e)
            raise HTTPException(404, str(e)) from None

    def log(kind: str, sid: str, detail: str) -> None:
        with lock:
            app.state.requests.append((kind, sid, detail))

    @app.get("/")
    def index() -> FileResponse:
        return FileResponse(STATIC / "viewer.html", media_type="text/html")

    @app.get("/api/slides")
    def slides() -> list[dict[str, Any]]:
        return [{"slide_id": s, "targets": list(e.targets)} for s, e in catalogue.slides.items()]

    @app.get("/api/slides/{sid}")
    def slide(sid: str) -> dict[str, Any]:
        entry(sid)
        return catalogue.describe(sid)

    @app.get("/dzi/{sid}/slide.dzi")
    def slide_dzi(sid: str) -> Response:
        entry(sid)
        dz = open_slide_dz(sid)
        return Response(dz.get_dzi("jpeg"), media_type="application/xml")

    @app.get("/dzi/{sid}/slide_files/{level}/{col}_{row}.jpeg")
    def slide_tile(sid: str, level: int, col: int, row: int) -> Response:
        entry(sid)
        dz = open_slide_dz(sid)
        try:
            tile = dz.get_tile(level, (col, row))
        except ValueError:
            raise HTTPException(404, "no such tile") from None
        log("slide", sid, f"{level}/{col}_{row}")
        return Response(jpeg_bytes(tile), media_type="image/jpeg")

    @app.get("/dzi/{sid}/map/{target}.dzi")
    def map_dzi(sid: str, target: str, threshold: float = Query(0.5, ge=0, le=1)) -> Response:
        dz, _ = catalogue.map_dz(sid, target_of(sid, target), threshold)
        return Response(dz.get_dzi("png"), media_type="application/xml")

    @app.get("/dzi/{sid}/map/{target}_files/{level}/{col}_{row}.png")
    def map_tile_route(
        sid: str, target: str, level: int, col: int, row: int,
        threshold: float = Query(0.5, ge=0, le=1),
    ) -> Response:  # fmt: skip
        dz, source = catalogue.map_dz(sid, target_of(sid, target), threshold)
        try:
            tile = map_tile(dz, source, level, col, row)
        except ValueError:
            raise HTTPException(404, "no such tile") from None
        log("map", sid, f"{target}@{threshold:g}:{level}/{col}_{row}")
        return Response(png_bytes(tile), media_type="image/png")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def serve(catalogue: Catalogue, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Run the viewer until interrupted."""
    import uvicorn

    uvicorn.run(create_app(catalogue), host=host, port=port, log_level="warning")
