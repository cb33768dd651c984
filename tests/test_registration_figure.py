"""The registration QC picture: verdict, local error per region and unmeasured tissue,
checked pixel by pixel on known grids."""

from __future__ import annotations

import numpy as np
import pytest

from cscvision.labels.registration import Level, Registration
from cscvision.labels.registration_figure import (
    ALPHA,
    OVER_RGB,
    RAMP,
    UNMEASURED_RGB,
    VERDICT_RGB,
    error_colours,
    error_panel,
    header_lines,
    layout,
    pixel_centres_um,
    qc_figure,
)
from cscvision.labels.registration_qc import local_to_json

MPP, ROWS, COLS = 4.0, 64, 96  # a 384 x 256 µm thumbnail, wider than high
STEP = 32.0  # local grid: 9 rows x 13 cols of nodes
GREY = 200  # the thumbnail's flat grey: the panel's tissue base is 160 + 0.37 * 200 = 234


def _known_grid() -> np.ndarray:
    """5 µm everywhere; the top-right corner (node rows <= 2, cols >= 9) unmeasured, the
    bottom-left corner (rows >= 6, cols <= 3) 30 µm: a transposed or flipped overlay puts
    either corner elsewhere."""
    g = np.full((9, 13), 5.0, np.float32)
    g[:3, 9:] = np.nan
    g[6:, :4] = 30.0
    return g


def _reg(qc: str = "pass", ok: bool = True, grid: np.ndarray | None = None) -> Registration:
    local = {"step_um": STEP, "radius_um": 160.0, "min_matches": 5}
    local["median_um"] = _known_grid() if grid is None else grid
    detail = {"local": local_to_json(local)}
    reason = "estimated error p90 14.0 µm > 10 µm (--qc-p90-um)" if qc == "warn" else ""
    return Registration("he.tiff", "ihc.tiff", 0.5, 0.5, np.eye(3), False, 0.0, 100, 90,
                        {"median": 4.0, "p90": 14.0 if qc == "warn" else 7.0}, 0.9, ok, 0.5,
                        "" if ok else "tissue overlap once registered Dice 0.20 < 0.5",
                        params={"max_local_error_um": 20.0}, error_detail=detail,
                        qc=qc if ok else "", qc_reason=reason)  # fmt: skip


def _level(glass_cols: int = 0) -> Level:
    mask = np.ones((ROWS, COLS), bool)
    mask[:, COLS - glass_cols :] = False
    rgb = np.full((ROWS, COLS, 3), GREY, np.uint8)
    return Level(np.zeros((ROWS, COLS), np.float32), mask, rgb, MPP)


def _region(shape: tuple[int, int], x_um: tuple[float, float], y_um: tuple[float, float]):
    """Panel pixels whose centres lie in [x0, x1) x [y0, y1) µm (a bool [rows, cols])."""
    xy = pixel_centres_um(shape, (COLS * MPP, ROWS * MPP)).reshape(*shape, 2)
    x, y = xy[..., 0], xy[..., 1]
    return (x >= x_um[0]) & (x < x_um[1]) & (y >= y_um[0]) & (y < y_um[1])


def _blend(rgb) -> np.ndarray:
    return np.round(ALPHA * np.asarray(rgb, float) + (1 - ALPHA) * (160 + 0.37 * GREY))


def test_colour_scale_maps_known_errors_to_their_colours():
    """Known answers: 0 µm is the ramp's start, the bound its end, a quarter of the bound
    its second anchor, anything over the bound red; NaN (unmeasured) is not red."""
    e = np.array([0.0, 3.0, 6.0, 12.0, 12.5, 40.0, np.nan])
    got = error_colours(e, 12.0)
    want = [RAMP[0], RAMP[1], RAMP[2], RAMP[4], OVER_RGB, OVER_RGB, RAMP[0]]
    np.testing.assert_array_equal(got, np.asarray(want, np.uint8))
    # the bound is honoured: 12 µm under a 20 µm bound is 3/5 of the way up, not red
    np.testing.assert_array_equal(error_colours(np.array([12.0]), 20.0)[0],
                                  np.round(0.6 * RAMP[2] + 0.4 * RAMP[3]))  # fmt: skip


@pytest.mark.parametrize("qc", ["pass", "warn"])
def test_error_panel_puts_each_known_region_in_its_place(qc):
    """An asymmetric known grid on a wider-than-high thumbnail: the unmeasured top-right
    corner is hatched (grey on a passed pair, red on a warned one, whose unmeasured tissue
    ``labels ihc`` excludes without an extrapolation to trust), the 30 µm bottom-left corner
    is red, the rest is the 5 µm colour, glass (the right-most 8 columns) stays white."""
    shape = (2 * ROWS, 2 * COLS)
    panel = error_panel(_level(glass_cols=8), _reg(qc), shape)
    assert panel.shape == (*shape, 3)
    # well inside each corner (nodes are nearest-node cells of +-16 µm)
    top_right = _region(shape, (9 * STEP, 11 * STEP - 16), (0, 2 * STEP))
    bottom_left = _region(shape, (0, 3 * STEP), (6 * STEP + 16, ROWS * MPP))
    middle = _region(shape, (5 * STEP, 7 * STEP), (3 * STEP, 5 * STEP))
    glass = _region(shape, ((COLS - 8) * MPP + 4, COLS * MPP), (0, ROWS * MPP))
    hatch = UNMEASURED_RGB if qc == "pass" else OVER_RGB
    corner = panel[top_right]
    is_hatch = (corner == hatch).all(-1)
    assert 0.15 < is_hatch.mean() < 0.5  # lines, not a fill
    assert (corner[~is_hatch] == np.round(160 + 0.37 * GREY)).all()  # no colour under it
    assert (panel[bottom_left] == _blend(OVER_RGB)).all()
    assert (panel[middle] == _blend(error_colours(np.array([5.0]), 20.0)[0])).all()
    assert (panel[glass] == 255).all()
    # nowhere else: the 5 µm colour fills every other tissue pixel but the hatched corner's
    # and the red one's (a transposed or flipped overlay would put them elsewhere)
    reds = (panel == _blend(OVER_RGB)).all(-1)
    assert not reds[~_region(shape, (0, 4 * STEP), (5 * STEP, ROWS * MPP))].any()
    hatched = (panel == hatch).all(-1)
    assert not hatched[~_region(shape, (8 * STEP, COLS * MPP), (0, 3 * STEP))].any()


@pytest.mark.parametrize("qc,ok", [("pass", True), ("warn", True), ("", False)])
def test_figure_header_carries_the_verdict(qc, ok):
    """The header band is green for a passed pair, amber for a warned one, red for a
    refused one, and says why; the error panel sits where :func:`layout` says."""
    reg = _reg(qc, ok)
    fixed = _level()
    fig = qc_figure(fixed, fixed, reg, "S1  CD44")
    state = "refused" if not ok else qc
    lines = [line for line, _ in header_lines(reg, "S1  CD44", 900)]
    head, top, right, shape = layout(len(lines), fixed.mask.shape)
    band = fig[:head, -8:].reshape(-1, 3)  # the band's right end: no text there
    assert (band == VERDICT_RGB[state]).all()
    assert all((fig[:head, -8:] != VERDICT_RGB[s]).any() for s in VERDICT_RGB if s != state)
    assert lines[0] == f"S1  CD44   {state.upper()}"
    assert ("--qc-p90-um" in lines[1]) == (qc == "warn")
    assert ("Dice 0.20" in lines[1]) == (not ok)
    assert any("median 4.0 µm, p90" in line for line in lines)
    panel = fig[top : top + shape[0], right : right + shape[1]]
    np.testing.assert_array_equal(panel, error_panel(fixed, reg, shape))


@pytest.mark.parametrize("title", ["SYN-P001-S01\nCD44", "TCGA-" + "0123456789" * 12 + "  CD44"])
def test_header_keeps_a_long_or_multi_line_title_in_its_band(title):
    """A slide id is the user's string: a newline in it or one too long for the picture
    must neither spill over the reason line nor push the verdict off the right edge."""
    from cscvision.labels.registration_figure import WIDTH_PX, _font

    reg = _reg("", ok=False)
    lines = header_lines(reg, title, 900)
    assert all(line.isprintable() and _font(size).getlength(line) <= 900 for line, size in lines)
    assert "REFUSED" in " ".join(line for line, _ in lines)
    fig = qc_figure(_level(), _level(), reg, title)
    assert fig.shape[1] == WIDTH_PX


def test_figure_without_a_local_grid_hatches_all_tissue():
    """A pair too poor in dense matches for a grid: every tissue pixel is unmeasured."""
    reg = _reg("warn")
    reg = Registration(**{**reg.__dict__, "error_detail": {}})
    panel = error_panel(_level(), reg, (ROWS, COLS))
    hatch = (panel == OVER_RGB).all(-1)
    assert 0.15 < hatch.mean() < 0.5 and ((panel == OVER_RGB) | (panel == 234)).all()


def test_exclusion_drawn_is_the_rule_labels_ihc_applies():
    """Per pixel, the red hatching is exactly ``registration_exclusions`` at that pixel's
    centre (the rule ``labels ihc`` applies at tile centres)."""
    from cscvision.labels.registration_qc import registration_exclusions

    reg = _reg("warn")
    shape = (ROWS, COLS)
    panel = error_panel(_level(), reg, shape)
    xy = pixel_centres_um(shape, (COLS * MPP, ROWS * MPP))
    over, far = (a.reshape(shape) for a in registration_exclusions(reg, xy))
    red = (panel == OVER_RGB).all(-1) | (panel == _blend(OVER_RGB)).all(-1)
    assert not (red & ~(over | far)).any()
    assert (over == (panel == _blend(OVER_RGB)).all(-1)).all()


def test_colour_bar_survives_the_palette_png(tmp_path):
    """Written as a 256-colour PNG over a busy thumbnail, the colour bar still reads the
    scale: each of its pixels within 16 levels (median cut: 91) of the colour of its µm value."""
    from PIL import Image

    from cscvision.core.io import write_png

    rng = np.random.default_rng(0)
    t = rng.random((ROWS, COLS, 1))  # pink to purple, as H&E
    rgb = np.array([235, 190, 225]) * (1 - t) + np.array([90, 40, 140]) * t
    rgb = (rgb + rng.normal(0, 8, rgb.shape)).clip(0, 255).astype(np.uint8)
    busy = Level(np.zeros((ROWS, COLS), np.float32), np.ones((ROWS, COLS), bool), rgb, MPP)
    reg = _reg("warn")
    path = write_png(tmp_path / "qc.png", qc_figure(busy, busy, reg, "S1  CD44"), colours=256)
    fig = np.asarray(Image.open(path).convert("RGB")).astype(int)
    _, top, right, shape = layout(len(header_lines(reg, "S1  CD44", 900)), (ROWS, COLS))
    bar = fig[top + shape[0] + 17, right : right + 300]
    assert np.abs(bar - error_colours(np.linspace(0, 20.0, 300), 20.0)).max() <= 16


def test_truth_script_pools_the_true_error_onto_the_right_nodes():
    """``scripts/eval_qc_figure.py`` (the picture's check against the truth): a point map
    whose truth is the identity plus x / 10 µm along x (true error x / 10 where the
    registration is the identity, 0 on the IHC-less top rows) pools onto node (r, c) as
    about 3.2 c, NaN above; a transposed pooling would grow with r."""
    import importlib
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    truth_script = importlib.import_module("eval_qc_figure")
    step, rows, cols = 8.0, 32, 48  # 384 x 256 µm of points
    rr, cc = np.mgrid[0:rows, 0:cols]
    x, y = (cc + 0.5) * step, (rr + 0.5) * step
    ihc = np.ones((rows, cols), np.uint8)
    ihc[:8] = 0  # the top 64 µm: no IHC tissue, no truth
    pm = {"step_um": step, "he_tissue": np.ones((rows, cols), np.uint8), "ihc_tissue": ihc,
          "ihc_xy_um": np.stack([x + x / 10, y]).astype(np.float32)}  # fmt: skip
    reg = _reg("pass")
    truth = truth_script.true_node_grid(reg, pm, (9, 13))
    assert np.isnan(truth[:2]).all() and np.isfinite(truth[3:, :12]).all()
    c = np.arange(1, 12)
    np.testing.assert_allclose(truth[4, 1:12], 3.2 * c, atol=0.5)
    np.testing.assert_allclose(truth[3:, 5], truth[3, 5], atol=1e-6)


@pytest.mark.parametrize(("qc", "bend"), [("pass", 0.2), ("warn", 0.4)])
def test_unmeasured_hatching_follows_the_extrapolated_error(qc, bend):
    """Known answer: the unmeasured corner's nodes lie 1, 2 or 3 steps (32 µm) from a
    measured one: row 2 one step, rows 0-1 of columns 10-12 two or three. Extrapolated
    (bend x distance): at bend 0.2 on a passed pair, 6.4 µm (grey) and 12.8-19.2 µm
    (orange: above --qc-p90-um 10, under the exclusion bound 20); at bend 0.4 on a warned
    pair, 12.8 µm (orange) and 25.6-38.4 µm (red: excluded)."""
    from cscvision.labels.registration_figure import FAR_RGB

    reg = _reg(qc)
    reg.error_detail["extrapolated"] = {"bend_p90": bend}
    reg.params["qc_p90_um"] = 10.0
    shape = (2 * ROWS, 2 * COLS)
    panel = error_panel(_level(), reg, shape)
    one = _region(shape, (9 * STEP - 12, COLS * MPP), (2 * STEP - 12, 2 * STEP + 12))
    two = _region(shape, (10 * STEP - 12, COLS * MPP), (0, STEP + 12))
    near, far = (UNMEASURED_RGB, FAR_RGB) if qc == "pass" else (FAR_RGB, OVER_RGB)
    for where, rgb in ((one, near), (two, far)):
        hatched = ~(panel[where] == 234).all(-1)
        assert 0.15 < hatched.mean() < 0.5
        assert (panel[where][hatched] == rgb).all()


def test_checkerboard_shows_the_registered_ihc_where_the_transform_puts_it():
    """A known translation (fixed µm + (40, 20) = moving µm) of an IHC level that is blue
    with a red block at moving x 200-280, y 100-180 µm: the IHC squares show red exactly
    over fixed x 160-240, y 80-160 µm and blue elsewhere on the section, the H&E squares
    stay grey, and both kinds of square are there (an unwarped IHC, or H&E in every
    square, fails)."""
    import dataclasses

    from cscvision.labels.registration_figure import checkerboard

    fixed = _level()
    rgb = np.zeros((ROWS, COLS, 3), np.uint8)
    rgb[...] = (40, 40, 200)
    rgb[25:45, 50:70] = (220, 0, 0)  # rows y 100-180 µm, cols x 200-280 µm at 4 µm/px
    moving = Level(np.zeros((ROWS, COLS), np.float32), np.ones((ROWS, COLS), bool), rgb, MPP)
    m = np.array([[1.0, 0.0, 40.0], [0.0, 1.0, 20.0], [0.0, 0.0, 1.0]])
    reg = dataclasses.replace(_reg(), matrix_um=m, flow_um=None)
    shape = (2 * ROWS, 2 * COLS)
    board = checkerboard(fixed, moving, reg, shape).astype(int)
    red = (board[..., 0] > 150) & (board[..., 2] < 80)
    blue = (board[..., 2] > 150) & (board[..., 0] < 100)
    grey = (np.abs(board - GREY) <= 2).all(-1)
    inner = _region(shape, (164, 236), (84, 156))  # 2 µm inside the block's image
    outer = ~_region(shape, (156, 244), (76, 164))
    assert red[inner].mean() > 0.3 and (red | grey)[inner].mean() > 0.97
    assert not red[outer].any()
    on_ihc = _region(shape, (8, COLS * MPP - 48), (8, ROWS * MPP - 28)) & outer
    assert blue[on_ihc].mean() > 0.3 and (blue | grey)[on_ihc].mean() > 0.9


def test_a_refused_pair_draws_no_red_exclusion():
    """A refused pair gives no labels, so its error panel has no "excluded" red: the 30 µm
    corner that is red on an accepted pair is grey there."""
    shape = (2 * ROWS, 2 * COLS)
    refused = error_panel(_level(), _reg("", ok=False), shape)
    assert not (refused == _blend(OVER_RGB)).all(-1).any()
    corner = refused[_region(shape, (0, 3 * STEP), (6 * STEP + 16, ROWS * MPP))].astype(int)
    assert (corner.max(-1) - corner.min(-1) <= 1).all()  # grey, not a colour
