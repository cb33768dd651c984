"""`cscvision view`: a real uvicorn server on loopback, its tiles, maps and path checks."""

from __future__ import annotations

import http.client
import io
import json
import threading
import time

import numpy as np
import pytest
from PIL import Image

from cscvision.views.app import create_app
from cscvision.views.server import HEATMAP_ALPHA, Catalogue, heatmap_image


@pytest.fixture(scope="module")
def server(demo_batch):
    import uvicorn

    app = create_app(Catalogue(demo_batch["out"]))
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield {"port": port, "app": app, "out": demo_batch["out"]}
    srv.should_exit = True
    thread.join(timeout=10)


def get(server, path: str) -> tuple[int, bytes]:
    """A raw request: the path goes out exactly as written (no client-side normalising)."""
    conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=30)
    conn.putrequest("GET", path, skip_host=False, skip_accept_encoding=True)
    conn.endheaders()
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, body


def first_slide(server) -> str:
    status, body = get(server, "/api/slides")
    assert status == 200
    return json.loads(body)[0]["slide_id"]


def test_slide_list_and_description(server):
    status, body = get(server, "/api/slides")
    slides = json.loads(body)
    assert status == 200 and len(slides) == 2  # the broken slide has no summary
    sid = slides[0]["slide_id"]
    info = json.loads(get(server, f"/api/slides/{sid}")[1])
    summary = json.loads((server["out"] / sid / "summary.json").read_text())
    targets = [t["name"] for t in info["targets"] if not t.get("trust")]
    assert targets == list(summary["targets"])
    maps = np.load(server["out"] / sid / "maps.npz")
    # the demo model keeps an OOD record: its map is a layer, raw values for the readout
    ood = next(t for t in info["targets"] if t["name"] == "ood")
    assert ood["trust"] and ood["threshold"] == 0.5  # the ratio 1 on the 0-2 scale
    np.testing.assert_allclose(np.array(ood["values"], dtype=float), maps["ood"], atol=1e-4)
    grid = np.array(info["targets"][0]["values"], dtype=float)
    np.testing.assert_allclose(grid, maps["stemness"], atol=1e-4)  # NaN where no tile either way
    assert info["map"]["px_l0"] == pytest.approx(float(maps["transform"][2]))


def test_deep_zoom_tiles_of_the_slide_and_a_map(server):
    sid = first_slide(server)
    status, dzi = get(server, f"/dzi/{sid}/slide.dzi")
    assert status == 200 and b'Width="2048"' in dzi and b'Height="2048"' in dzi
    status, jpeg = get(server, f"/dzi/{sid}/slide_files/11/0_0.jpeg")  # level 11 = 2048 px
    tile = Image.open(io.BytesIO(jpeg))
    assert status == 200 and tile.size == (255, 255)  # 254 + one pixel of overlap
    status, png = get(server, f"/dzi/{sid}/map/stemness_files/8/0_0.png?threshold=0.5")
    img = Image.open(io.BytesIO(png))
    assert status == 200 and img.mode == "RGBA"
    assert np.asarray(img)[..., 3].min() == 0  # transparent where no tile was scored


@pytest.mark.parametrize(
    "path",
    [
        "/static/../../../etc/passwd",
        "/static/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/static/..%2f..%2f..%2fetc%2fpasswd",
        "/static/%2fetc%2fpasswd",
        "/static//etc/passwd",
        "/dzi/..%2f..%2f..%2fetc/slide.dzi",
        "/dzi/%2Fetc%2Fpasswd/slide.dzi",
        "/dzi/../../etc/passwd/slide.dzi",
        "/api/slides/..%2F..%2Fsummary.json",
        "//etc/passwd",
        "/../../../../etc/passwd",
    ],
)
def test_path_traversal_is_refused(server, path):
    status, body = get(server, path)
    assert status in (400, 404, 405), (path, status)
    assert b"root:" not in body


def test_unknown_target_and_bad_threshold(server):
    sid = first_slide(server)
    assert get(server, f"/dzi/{sid}/map/nope.dzi")[0] == 404
    assert get(server, f"/dzi/{sid}/map/ood.dzi?threshold=0.5")[0] == 200
    assert get(server, "/dzi/nope/map/ood.dzi")[0] == 404
    assert get(server, f"/dzi/{sid}/map/stemness.dzi?threshold=7")[0] == 422


def test_heatmap_image_known_answer():
    prob = np.array([[np.nan, 0.2], [0.9, 0.95]], np.float32)
    tissue = np.array([[1.0, 1.0], [1.0, 0.0]], np.float32)
    img = np.asarray(heatmap_image(prob, tissue, 0.5, (200, 10, 10), scale=24))
    assert img.shape == (48, 48, 4)
    assert img[5, 5, 3] == 0  # NaN: transparent
    assert img[12, 36, 3] == int(0.2 * 200) and tuple(img[12, 36, :3]) == (200, 10, 10)
    assert img[36, 36, 3] == 0  # off tissue: not drawn although p = 0.95
    # the region (only the lower-left pixel) is outlined in black on its border, not inside
    assert tuple(img[24, 12]) == (0, 0, 0, 255) and tuple(img[47, 12]) == (0, 0, 0, 255)
    assert tuple(img[36, 12, :3]) == (200, 10, 10) and img[36, 12, 3] == int(0.9 * 200)
    # "no outline" (1.0) draws none even where a value sits at the top of the range
    top = np.asarray(heatmap_image(np.ones((2, 2), np.float32), np.ones((2, 2)), 1.0,
                                   (200, 10, 10), scale=24))  # fmt: skip
    assert (top[..., 3] == int(HEATMAP_ALPHA)).all()


def test_view_command_refuses_a_folder_without_outputs(tmp_path, capsys):
    from cscvision.cli import main

    assert main(["view", str(tmp_path)]) == 2
    assert "no <slide_id>/summary.json" in capsys.readouterr().err


def test_a_map_without_a_threshold_starts_without_an_outline(tmp_path):
    from cscvision.views.server import SlideEntry

    summary = {"targets": {"stemness": {"threshold": 0.37}, "density_treg": {"mean": 812.0}}}
    entry = SlideEntry("s", tmp_path, tmp_path / "s.svs", summary)
    assert entry.thresholded("stemness") and entry.threshold("stemness") == 0.37
    # regression scores and MIL percentiles: no region is called, so no outline at 0.5
    assert not entry.thresholded("density_treg") and entry.threshold("density_treg") == 1.0


def test_a_density_map_is_drawn_over_its_range_and_read_out_in_its_unit(tmp_path):
    from cscvision.views.server import SlideEntry, SlideMaps

    density = np.array([[0.0, 500.0], [1000.0, np.nan]], np.float32)
    np.savez(tmp_path / "maps.npz", targets=np.array(["density_treg"]), density_treg=density,
             tissue=np.ones((2, 2), np.float32), transform=np.array([0.0, 0.0, 64.0]))  # fmt: skip
    unit = "Tregs / mm² of tissue"
    summary = {"targets": {"density_treg": {"unit": unit, "value_range": [0.0, 2000.0]}}}
    maps = SlideMaps(SlideEntry("s", tmp_path, tmp_path / "s.svs", summary))
    np.testing.assert_allclose(maps.maps["density_treg"][:, 0], [0.0, 0.5])  # drawn 0-1
    np.testing.assert_allclose(maps.raw["density_treg"][1, 0], 1000.0)  # read in cells/mm²
