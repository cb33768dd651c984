"""``cscvision view``: browse a batch's slides with their heatmaps in a web browser."""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "view",
        help="browse slides and heatmaps in a web browser (local server)",
        description=(
            "Serve OUT_DIR's slides (Deep Zoom, through OpenSlide) with one heatmap layer per "
            "target: toggle, opacity, threshold, region outlines, the probability under the "
            "cursor, and a slide picker. Binds to 127.0.0.1; from a cluster node, tunnel it: "
            "ssh -L PORT:localhost:PORT NODE, then open http://localhost:PORT."
        ),
    )
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="the --out folder of infer")
    p.add_argument("--slide", default=None, metavar="ID", help="slide to open first")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765)")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a --host other than loopback: the slides become visible to anyone who "
        "can reach the port, and the server has no authentication",
    )
    p.set_defaults(func=run)


LOOPBACK = ("127.0.0.1", "localhost", "::1")
REMOTE_WARNING = (
    "the slides and maps become visible to anyone who can reach this port, and the viewer "
    "has no authentication"
)


def _missing_extra() -> str | None:
    from importlib.util import find_spec

    missing = [m for m in ("fastapi", "uvicorn") if find_spec(m) is None]
    if missing:
        return f'the viewer needs {", ".join(missing)}: pip install "cscvision[viewer]"'
    return None


def run(args: argparse.Namespace) -> int:
    missing = _missing_extra()
    if missing:
        print(f"cscvision view: {missing}", file=sys.stderr)
        return 2
    if not 0 < args.port < 65536:
        print(f"cscvision view: --port {args.port}: choose 1-65535", file=sys.stderr)
        return 2
    remote = args.host not in LOOPBACK
    if remote and not args.allow_remote:
        print(
            f"cscvision view: --host {args.host} binds beyond this machine: {REMOTE_WARNING}; "
            "pass --allow-remote to do it anyway, or tunnel (ssh -L) to 127.0.0.1",
            file=sys.stderr,
        )
        return 2
    from cscvision.views.app import serve
    from cscvision.views.server import Catalogue

    catalogue = Catalogue(args.out_dir)  # a ViewerError: exit 2 (cli.run_command)
    for line in catalogue.skipped:
        print(f"cscvision view: WARNING: {line}", file=sys.stderr)
    for sid in catalogue.missing_slides():
        path = catalogue.slides[sid].slide_path
        print(f"cscvision view: {sid}: slide file {path} not found; showing its maps alone",
              file=sys.stderr)  # fmt: skip
    if remote:
        print(f"cscvision view: WARNING: --host {args.host}: {REMOTE_WARNING}", file=sys.stderr)
    if args.slide and args.slide not in catalogue.slides:
        print(
            f"cscvision view: --slide {args.slide}: not in {args.out_dir} (have "
            f"{', '.join(sorted(catalogue.slides))})",
            file=sys.stderr,
        )
        return 2
    query = f"?slide={args.slide}" if args.slide else ""
    print(f"viewer: {len(catalogue.slides)} slides from {catalogue.out_dir}")
    print(f"open http://{args.host}:{args.port}/{query}  (Ctrl-C stops)")
    if args.host in ("127.0.0.1", "localhost"):
        print(
            f"from another machine: ssh -L {args.port}:localhost:{args.port} "
            f"{socket.gethostname()}, then open http://localhost:{args.port}/{query}"
        )
    serve(catalogue, host=args.host, port=args.port)
    return 0
