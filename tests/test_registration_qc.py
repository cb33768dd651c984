"""Registration QC: a verdict per pair and tiles excluded where the registration is unsure."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from cscvision.labels import registration_match
from cscvision.labels.ihc import marker_config
from cscvision.labels.registration import Registration, RegistrationParams, _errors_and_flow
from cscvision.labels.registration_qc import local_error_at, registration_exclusions
from cscvision.slides.grid import GridSpec

F, SIDE = 2.0, 320  # a 640 µm square section at 2 µm/px
CORNER_UM = 380.0  # the bottom-right corner beyond this (x and y) is bent
SMOOTH_UM = 80.0  # the field's smoothing (160 µm by default: a bigger section, slower)


def _pair_matches(bend_um: float, seed: int = 0):
    """Matches every 16 µm of the section under a smooth 15 µm warp (which an 80 µm field
    follows) plus 1 µm of noise per axis; beyond ``CORNER_UM`` in x and y, a ``bend_um``
    displacement that turns over every 40 µm, which no 80 µm field follows."""
    g = np.random.default_rng(seed)
    ys, xs = np.mgrid[4:SIDE:8, 4:SIDE:8]
    src = (np.stack([xs.ravel(), ys.ravel()], 1) + 0.5) * F
    x, y = src.T
    smooth = 15.0 * np.stack([np.sin(x / 200.0), np.cos(y / 200.0)], 1)
    corner = ((x > CORNER_UM) & (y > CORNER_UM))[:, None]
    bend = bend_um * np.stack([np.sin(2 * np.pi * y / 80.0), np.cos(2 * np.pi * x / 80.0)], 1)
    dst = src + smooth + corner * bend + g.normal(0, 1.0, src.shape)
    return src, dst


def _register(bend_um: float) -> Registration:
    """The registration's error, field and QC from these matches (the real code from the
    matches on: held-out folds, field rounds, local error grid, verdict)."""
    from cscvision.labels.registration_qc import verdict

    src, dst = _pair_matches(bend_um)

    def matcher(fixed, moving, through, max_patches, search_um, tested=None):
        if tested is not None:
            tested[0] += len(src)
        return src, dst

    level = SimpleNamespace(mpp=F, image=np.zeros((SIDE, SIDE), np.float32))
    p = RegistrationParams(flow_smooth_um=SMOOTH_UM)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(registration_match, "template_matches", matcher)
        out = _errors_and_flow(level, level, np.eye(3), p, src, dst, 0)
    qc, why = verdict(out["error_um"]["p90"], p.qc_p90_um)
    return Registration("he", "ihc", 0.5, 0.5, np.eye(3), False, 0.0, len(src), len(src),
                        out["error_um"], 0.9, True, 0.5, "", out["flow_um"],
                        out["flow_step_um"], {"max_local_error_um": p.max_local_error_um},
                        out["error_detail"], qc, why, out.get("deformation_um", {}))  # fmt: skip


@pytest.fixture(scope="module")
def bent() -> Registration:
    return _register(30.0)


@pytest.fixture(scope="module")
def plain() -> Registration:
    return _register(0.0)


def _tile_centres(tile_um: float = 56.0) -> np.ndarray:
    c = np.arange(tile_um / 2, SIDE * F, tile_um)
    xx, yy = np.meshgrid(c, c)
    return np.stack([xx.ravel(), yy.ravel()], 1)


def test_a_bent_corner_warns_and_only_its_tiles_are_excluded(bent, plain):
    """Known answer: a 30 µm bend over 40 µm in one corner (16 % of the section) is beyond
    an 80 µm field: the pair warns, the tiles well inside the corner are excluded and no
    tile away from it is; an unbent pair passes and loses no tile, and its field's
    displacement (deformation) reads the smooth warp it follows."""
    reg = bent
    assert reg.qc == "warn" and reg.error_um["p90"] > 10 and "--qc-p90-um" in reg.qc_reason
    centres = _tile_centres()
    over, unmeasured = registration_exclusions(reg, centres)
    excluded = over | unmeasured
    inside = (centres > CORNER_UM + SMOOTH_UM / 2).all(axis=1)
    away = (centres < CORNER_UM - 2 * SMOOTH_UM).any(axis=1)
    assert excluded[inside].all(), local_error_at(reg.error_detail["local"], centres[inside])
    assert not excluded[away].any()
    assert plain.qc == "pass" and plain.error_um["p90"] < 5
    assert not np.any(registration_exclusions(plain, centres))
    assert plain.deformation_um["median"] > 5  # the smooth 15 µm warp: the field follows it


def test_unmeasured_tiles_are_excluded_only_on_a_warned_pair():
    """Known answer on a hand-made grid: a tile over a node above the bound is excluded on
    any pair; a tile over an unmeasured node only when the pair warns; a refused pair
    excludes nothing (its marker is dropped anyway)."""
    local = {"step_um": 100.0, "median_um": [[3.0, 25.0, None]]}
    centres = np.array([[0.0, 0.0], [100.0, 0.0], [200.0, 0.0]])

    def reg(qc: str, ok: bool = True):
        return SimpleNamespace(ok=ok, qc=qc, params={"max_local_error_um": 20.0},
                               error_detail={"local": local})  # fmt: skip

    over, unmeasured = registration_exclusions(reg("pass"), centres)
    assert over.tolist() == [False, True, False] and not unmeasured.any()
    over, unmeasured = registration_exclusions(reg("warn"), centres)
    assert over.tolist() == [False, True, False] and unmeasured.tolist() == [False, False, True]
    assert not np.any(registration_exclusions(reg("", ok=False), centres))
    # the JSON form keeps only the measured nodes' box, and reads back the same
    from cscvision.labels.registration_qc import local_to_json

    full = np.full((6, 8), np.nan)
    full[2, 3], full[3, 5] = 4.0, 30.0
    saved = local_to_json({"step_um": 100.0, "median_um": full})
    assert saved["origin"] == [2, 3] and np.shape(saved["median_um"]) == (2, 3)
    pts = np.array([[300.0, 200.0], [500.0, 300.0], [0.0, 0.0], [9e9, 9e9]])
    np.testing.assert_array_equal(local_error_at(saved, pts), [4.0, 30.0, np.nan, np.nan])
    empty = local_to_json({"step_um": 100.0, "median_um": np.full((3, 3), np.nan)})
    assert np.isnan(local_error_at(empty, pts)).all()
    # no grid at all (too few dense matches): unmeasured everywhere, so a warned pair loses
    # every tile and a passing one none (review: a warned pair without a grid lost none)
    bare = SimpleNamespace(ok=True, qc="warn", params={}, error_detail={})
    assert registration_exclusions(bare, centres)[1].all()
    bare.qc = "pass"
    assert not np.any(registration_exclusions(bare, centres))


def test_a_warned_pair_keeps_unmeasured_tiles_its_extrapolation_trusts():
    """Known answer: nodes 100 µm apart, measured at x = 0 only; a field bending 0.05 µm/µm
    extrapolates 5, 10, 15, 20, 25, 30 µm at x = 100...600, so with the 20 µm bound only the
    tiles at 500 and 600 µm are excluded; no recorded bend: every unmeasured tile is."""
    local = {"step_um": 100.0, "median_um": [[3.0] + [None] * 6]}
    centres = np.array([[100.0 * i, 0.0] for i in range(7)])
    detail = {"local": local, "extrapolated": {"bend_p90": 0.05}}
    reg = SimpleNamespace(ok=True, qc="warn", params={"max_local_error_um": 20.0},
                          error_detail=detail)  # fmt: skip
    over, unmeasured = registration_exclusions(reg, centres)
    assert not over.any()
    assert unmeasured.tolist() == [False] * 5 + [True, True]
    reg.error_detail["extrapolated"] = {"bend_p90": 0.0}
    assert registration_exclusions(reg, centres)[1].tolist() == [False] + [True] * 6
    reg.qc = "pass"
    assert not np.any(registration_exclusions(reg, centres))


@pytest.mark.parametrize("qc", ["pass", "warn"])
def test_label_tables_record_the_tiles_excluded_for_the_registration(qc, tmp_path):
    """A tile whose local error is over the bound gets valid = 0 in the table, with the
    reason and its position in the sidecar; the warned pair's verdict is recorded, its
    labels kept, and the CLI prints one line naming slide, marker and estimate."""
    from cscvision.cli.labels_ihc import _qc_warnings
    from cscvision.labels.ihc_labels import MarkerResult, SlideMeasure, label_slide

    n = 40  # H&E of 40 x 40 map cells of 4 µm; tiles of 80 µm at (0|80, 0|80) µm
    density = np.zeros((n, n), np.float32)
    density[:, :20] = 0.5
    frame = {"tissue": np.ones((n, n), np.float32), "positive": density, "density": density}
    local = {"step_um": 40.0, "median_um": [[2.0, 2.0, 2.0, 2.0]] * 2 + [[2.0, 2.0, 2.0, 30.0]] * 2}
    p90 = 14.0 if qc == "warn" else 6.0
    reg = Registration("he", "CD44", 0.5, 0.5, np.eye(3), False, 0.0, 20, 20,
                       {"median": 3.0, "p90": p90}, 0.9, True, 0.5, "", None, 0.0,
                       {"max_local_error_um": 20.0}, {"local": local}, qc,
                       "estimated error p90 14.0 µm > 10 µm (--qc-p90-um)" if qc == "warn" else "",
                       {"median": 40.0, "p90": 80.0})  # fmt: skip
    marker = MarkerResult("CD44", "CD44.tiff", reg, np.zeros((2, 2, 3), np.uint8), frame=frame)
    grid = SimpleNamespace(xy_l0=np.array([[0, 0], [160, 0], [0, 160], [160, 160]]),
                           plan=SimpleNamespace(tile_l0=160.0), slide_path="he.tiff")  # fmt: skip
    measure = SlideMeasure("S", grid, np.ones((10, 10), bool), 0.5, (0, 0, 320, 320), (marker,))
    cfg = marker_config({"markers": {"CD44": "stemness"}})
    spec = GridSpec(mpp=1.0, tile_px=80, mask_mpp=16.0)
    thresholds = {"CD44": SimpleNamespace(value=0.25, as_dict=lambda: {"value": 0.25})}
    result = label_slide(measure, cfg, spec, thresholds)
    table = result.table
    assert table.valid.tolist() == [True, True, True, False]  # the bottom-right tile
    np.testing.assert_allclose(table.values[:, 0], [1, 0, 1, 0])  # labels kept
    record = table.provenance["excluded_for_registration"]
    assert record["tiles"] == 1 and record["xy_l0"] == [[160, 160]]
    assert record["per_marker"]["CD44"]["local_error_over_bound"] == 1
    assert result.counts["excluded_registration"] == 1
    side = table.provenance["markers"]["CD44"]
    assert side["registration_qc"] == qc and side["deformation_um"]["median"] == 40.0
    lines = _qc_warnings(tmp_path, measure)
    if qc == "pass":
        assert lines == []
    else:
        assert len(lines) == 1 and lines[0].startswith("S CD44: registration QC warn")
        assert "p90 14.0 µm" in lines[0] and "S_CD44_qc.png" in lines[0]


def test_qc_picture_shows_the_warned_pair_and_its_bent_corner(bent, plain, tmp_path):
    """The PNG as written (a 256-colour palette): a warned pair's header is amber and its
    bent bottom-right corner red (local error over --max-local-error-um) or hatched red;
    the passed pair's header is green and its panel has no red at all."""
    from PIL import Image

    from cscvision.core.io import write_png
    from cscvision.labels.registration import Level
    from cscvision.labels.registration_figure import (
        OVER_RGB,
        VERDICT_RGB,
        header_lines,
        layout,
        qc_figure,
    )

    rgb = np.full((SIDE, SIDE, 3), (230, 180, 220), np.uint8)
    lv = Level(np.zeros((SIDE, SIDE), np.float32), np.ones((SIDE, SIDE), bool), rgb, F)
    for reg, state in ((bent, "warn"), (plain, "pass")):
        path = write_png(tmp_path / f"{state}.png", qc_figure(lv, lv, reg, "S  CD44"), colours=256)
        fig = np.asarray(Image.open(path).convert("RGB")).astype(int)
        head, top, right, shape = layout(len(header_lines(reg, "S  CD44", 900)), (SIDE, SIDE))
        assert np.abs(fig[:head, -8:] - VERDICT_RGB[state]).max() <= 8
        panel = fig[top : top + shape[0], right : right + shape[1]]
        red = (np.abs(panel - OVER_RGB).max(-1) <= 40) | (
            (panel[..., 0] > 200) & (panel[..., 1] < 110) & (panel[..., 2] < 110)
        )
        um = np.mgrid[0 : shape[0], 0 : shape[1]] * (SIDE * F / shape[0])  # (y, x) µm
        corner = (um > CORNER_UM + SMOOTH_UM / 2).all(0)
        away = (um < CORNER_UM - 2 * SMOOTH_UM).any(0)
        if state == "warn":
            assert red[corner].mean() > 0.3 and not red[away].any()
        else:
            assert not red.any()


def test_the_verdict_and_local_grid_survive_the_json_round_trip(bent):
    import json

    reg = bent
    back = Registration.from_dict(json.loads(json.dumps(reg.to_dict())))
    assert back.qc == "warn" and back.qc_reason == reg.qc_reason
    assert back.deformation_um == reg.deformation_um
    centres = _tile_centres()
    for a, b in zip(registration_exclusions(reg, centres), registration_exclusions(back, centres),
                    strict=True):  # fmt: skip
        assert a.tolist() == b.tolist()


def _half_matched(amp_um: float):
    """A 640 µm section under a smooth warp of ``amp_um`` * sin(x / 200 µm) in x (which an
    80 µm field follows), with matches (1 µm noise) only where x < 400 µm: the rest is
    tissue no match measures. Returns the real held-out error, field and local grid, the
    tissue points and the true error there."""
    from cscvision.labels.registration import Level, shared_tissue_um

    g = np.random.default_rng(1)
    ys, xs = np.mgrid[4:SIDE:8, 4:200:8]
    src = (np.stack([xs.ravel(), ys.ravel()], 1) + 0.5) * F
    warp = lambda xy: np.stack([amp_um * np.sin(xy[:, 0] / 200.0), 0 * xy[:, 0]], 1)  # noqa: E731
    dst = src + warp(src) + g.normal(0, 1.0, src.shape)

    def matcher(fixed, moving, through, max_patches, search_um, tested=None):
        if tested is not None:
            tested[0] += len(src)
        return src, dst

    whole = np.ones((SIDE, SIDE), bool)
    lv = Level(np.zeros((SIDE, SIDE), np.float32), whole, np.zeros((SIDE, SIDE, 3), np.uint8), F)
    p = RegistrationParams(flow_smooth_um=SMOOTH_UM)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(registration_match, "template_matches", matcher)
        out = _errors_and_flow(lv, lv, np.eye(3), p, src, dst, 0)
    local = out["error_detail"]["local"]
    tissue = shared_tissue_um(lv, lv, np.eye(3), out["flow_um"], out["flow_step_um"], 32.0)
    reg = Registration("he", "ihc", 0.5, 0.5, np.eye(3), False, 0.0, len(src), len(src), {},
                       0.9, True, 0.5, "", out["flow_um"], out["flow_step_um"])  # fmt: skip
    true = np.linalg.norm(reg.map_um(tissue) - (tissue + warp(tissue)), axis=1)
    return out, local, tissue, true


@pytest.mark.parametrize("amp_um", [4.0, 40.0])
def test_unmeasured_tissue_far_off_warns_though_the_held_out_p90_passes(amp_um):
    """Known answer: the field carries its last measured values flat into the unmatched
    third; under a 40 µm warp the true error there exceeds 10 µm on > 3 % of the tissue,
    under a 4 µm one nowhere. The held-out p90 (matches only) passes both: the old rule."""
    from cscvision.labels.registration_qc import extrapolated_error, verdict

    out, local, tissue, true = _half_matched(amp_um)
    assert out["error_um"]["p90"] < 10.0  # the matched part is followed
    assert verdict(out["error_um"]["p90"], 10.0)[0] == "pass"  # the rule before
    far = extrapolated_error(local, out["flow_um"], out["flow_step_um"], tissue, 10.0)
    truly_far = float((true > 10.0).mean())
    assert 0.2 < far["unmeasured_share"] < 0.3  # x 480-640 µm: matches to 400, radius 80
    qc, why = verdict(out["error_um"]["p90"], 10.0, far, 0.03)
    if amp_um > 10:
        assert truly_far > 0.03 and far["over_share"] > 0.03, (truly_far, far)
        assert qc == "warn" and "--qc-unmeasured-share" in why
    else:
        assert truly_far == 0.0 and far["over_share"] == 0.0
        assert qc == "pass"


def test_extrapolated_error_is_bend_times_distance():
    """Hand-computed: a field bending 0.1 µm/µm, nodes measured in columns 0-20 of 41
    (32 µm apart): unmeasured column c lies (c - 20) * 32 µm off, extrapolated 3.2 (c - 20)
    µm, over 10 µm from c = 24: 17 of 41 columns."""
    from cscvision.labels.registration_qc import extrapolated_error

    grid = np.full((21, 41), np.nan)
    grid[:, :21] = 3.0
    local = {"step_um": 32.0, "median_um": grid}
    rr, cc = np.mgrid[0:33, 0:41]  # the field every 40 µm over 1600 x 1280 µm
    flow = np.stack([0.1 * cc * 40.0, 0 * rr]).astype(np.float32)
    r, c = np.mgrid[0:21, 0:41]
    nodes = np.stack([c.ravel(), r.ravel()], 1) * 32.0
    far = extrapolated_error(local, flow, 40.0, nodes, 10.0)
    assert far["bend_p90"] == pytest.approx(0.1, abs=1e-4)
    assert far["unmeasured_share"] == pytest.approx(20 / 41, abs=1e-3)
    assert far["over_share"] == pytest.approx(17 / 41, abs=1e-3)
    assert extrapolated_error(local, None, 0.0, nodes, 10.0)["over_share"] == 0.0


def test_shared_tissue_drops_a_missing_piece_but_not_a_pale_edge():
    from cscvision.labels.registration import Level, shared_tissue_um

    fixed = np.ones((SIDE, SIDE), bool)
    moving = fixed.copy()
    moving[:, 200:] = False  # IHC tissue stops at x = 400 µm
    blank = np.zeros((SIDE, SIDE), np.float32)
    lv = [Level(blank, k, np.zeros((SIDE, SIDE, 3), np.uint8), F) for k in (fixed, moving)]
    xs = np.unique(shared_tissue_um(lv[0], lv[1], np.eye(3), None, 0.0, 16.0)[:, 0])
    # the last tissue pixel is centred at 399 µm: 416 lies within two 16 µm steps, 432 not
    assert xs.max() == pytest.approx(416.0)
