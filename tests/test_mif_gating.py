"""Gating and phenotype rules of mIF cells: known answers."""

from __future__ import annotations

import numpy as np
import pytest

from cscvision.cells.mif_gating import (
    GatingError,
    apply_rules,
    auto_threshold,
    gate,
    otsu_threshold,
    phenotype_table,
)
from cscvision.cells.mif_panel import PanelError, parse_panel

PANEL = {
    "nuclear_marker": "DAPI",
    "markers": [
        {"channel": "DAPI", "marker": "DAPI", "compartment": "nucleus"},
        {"channel": "c1", "marker": "CD4", "compartment": "membrane"},
        {"channel": "c2", "marker": "FOXP3", "compartment": "nucleus"},
        {"channel": "c3", "marker": "CD8", "compartment": "membrane", "threshold": 100.0},
        {"channel": "c4", "marker": "CD44", "compartment": "membrane"},
        {"channel": "c5", "marker": "CD133", "compartment": "membrane"},
        {"channel": "c6", "marker": "panCK", "compartment": "membrane"},
    ],
    "phenotypes": [
        {"type": "treg", "all": ["CD4", "FOXP3"]},
        {"type": "cd8_t", "all": ["CD8"]},
        {"type": "t_cell", "all": ["CD4"]},
        {"type": "csc_like", "all": ["panCK"], "any": ["CD44", "CD133"]},
        {"type": "tumour", "all": ["panCK"], "none": ["CD8"]},
    ],
    "default_type": "other",
}


def mixture(n_pos: int, n_neg: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Log-normal negatives around 300 and positives around 3000 (sd 0.35 in log)."""
    rng = np.random.default_rng(seed)
    values = np.concatenate([rng.lognormal(np.log(3000), 0.35, n_pos),
                             rng.lognormal(np.log(300), 0.35, n_neg)])  # fmt: skip
    truth = np.arange(n_pos + n_neg) < n_pos
    order = rng.permutation(len(values))
    return values[order], truth[order]


@pytest.mark.parametrize("guard", [True, False])
@pytest.mark.parametrize("method", ["otsu", "gmm"])
@pytest.mark.parametrize("share", [0.1, 0.5])
def test_gating_splits_a_two_population_mixture_where_it_is(method, share, guard):
    values, truth = mixture(int(4000 * share), int(4000 * (1 - share)))
    threshold, pos = gate(values, method, guard=guard)
    # the populations cross at exp(mean of the log means) ~ 949; each sits 3.3 sd away
    assert 500 < threshold < 1800
    assert pos.mean() == pytest.approx(share, abs=0.01)
    assert (pos == truth).mean() > 0.995


def rare_mixture(share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """10 000 cells: negatives log-normal around 300 (sd 0.25 in log), positives 2 log units
    higher (around 2217, sd 0.35): the macrophage markers' shape on synthetic mIF."""
    rng = np.random.default_rng(seed)
    n_pos = int(10_000 * share)
    values = np.concatenate([rng.lognormal(np.log(300) + 2.0, 0.35, n_pos),
                             rng.lognormal(np.log(300), 0.25, 10_000 - n_pos)])  # fmt: skip
    return values, np.arange(10_000) < n_pos


def f1(pos: np.ndarray, truth: np.ndarray) -> float:
    return 2 * (pos & truth).sum() / (pos.sum() + truth.sum())


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("method", ["otsu", "gmm", "negative"])
def test_a_rare_positive_population_is_gated_between_the_two(method, seed):
    """1 % positives: Otsu's split falls inside the negative peak (a third of the cells called
    positive); the guard sees that the split's positives are the peak's upper half and gates
    from the negative peak instead, between the populations."""
    values, truth = rare_mixture(0.01, seed)
    threshold, pos = gate(values, method)
    # 2 SD above the negatives' centre, 2 SD below the positives'
    assert 300 * np.exp(2 * 0.25) < threshold < 2217 * np.exp(-2 * 0.35)
    assert f1(pos, truth) > 0.85
    assert pos.sum() < 2 * truth.sum()


def test_otsu_alone_fails_the_rare_population_and_the_guard_says_so():
    values, truth = rare_mixture(0.01, 0)
    split = otsu_threshold(values)
    assert split < 300 * np.exp(0.25)  # inside the negative peak: the old rule's failure
    assert (values > split).mean() > 0.3 and f1(values > split, truth) < 0.1
    assert gate(values, "otsu", guard=False)[0] == split
    threshold, guarded = auto_threshold(values, "otsu")
    assert guarded and threshold > 300 * np.exp(2 * 0.25)


@pytest.mark.parametrize("method", ["otsu", "gmm"])
def test_a_common_positive_population_keeps_its_split(method):
    """40 % positives: the split is right and the guard leaves it alone (the negative gate
    alone would do as well here, but not where positives outnumber negatives)."""
    values, truth = rare_mixture(0.4, 0)
    threshold, guarded = auto_threshold(values, method)
    assert not guarded
    assert 300 * np.exp(2 * 0.25) < threshold < 2217 * np.exp(-2 * 0.35)
    assert f1(values > threshold, truth) > 0.98
    values, truth = rare_mixture(0.7, 1)  # the peak is the positives': no negative gate
    threshold, guarded = auto_threshold(values, method)
    assert not guarded and f1(values > threshold, truth) > 0.98


def test_a_panel_threshold_wins_and_nan_is_negative():
    values = np.array([50.0, 99.0, 101.0, np.nan, 5000.0])
    threshold, pos = gate(values, "otsu", threshold=100.0)
    assert threshold == 100.0 and pos.tolist() == [False, False, True, False, True]
    with pytest.raises(GatingError, match="one intensity"):
        gate(np.full(10, 7.0), "otsu")
    with pytest.raises(GatingError, match="method"):
        gate(values, "kmeans")


def test_phenotype_rules_on_cells_with_known_marker_calls():
    panel = parse_panel(PANEL, "panel.yaml")
    calls = {  # one cell per column
        "CD4":   [1, 1, 0, 0, 0, 0, 0, 1, 0],
        "FOXP3": [1, 0, 0, 0, 0, 0, 1, 1, 0],
        "CD8":   [0, 0, 1, 0, 0, 0, 0, 1, 0],
        "CD44":  [0, 0, 0, 1, 0, 0, 1, 0, 0],
        "CD133": [0, 0, 0, 0, 1, 0, 0, 0, 0],
        "panCK": [0, 0, 0, 1, 1, 1, 0, 0, 0],
    }  # fmt: skip
    positive = {m: np.array(v, bool) for m, v in calls.items()}
    types = apply_rules(positive, panel.rules, panel.default_type)
    assert types.tolist() == ["treg", "t_cell", "cd8_t", "csc_like", "csc_like", "tumour",
                              "other", "treg", "other"]  # fmt: skip


def test_phenotype_table_writes_the_cell_table_contract():
    panel = parse_panel(PANEL, "panel.yaml")
    rng = np.random.default_rng(1)
    n = 400
    truth = {m.marker: rng.uniform(size=n) < 0.3 for m in panel.measured}
    intensity = {m: np.where(p, 3000.0, 300.0) * rng.uniform(0.8, 1.25, n)
                 for m, p in truth.items()}  # fmt: skip
    intensity["CD8"] = np.where(truth["CD8"], 150.0, 60.0)  # the panel's threshold: 100
    intensity["DAPI"] = np.full(n, 1000.0)
    table, thresholds, guarded = phenotype_table(rng.uniform(0, 100, n), rng.uniform(0, 100, n),
                                                 intensity, panel, mpp=0.5)  # fmt: skip
    assert guarded == ()
    assert thresholds["CD8"] == 100.0 and set(thresholds) == {m.marker for m in panel.measured}
    for m, p in truth.items():
        assert (np.asarray(table.markers[f"{m}_pos"]) == p).all(), m
    expected = apply_rules(truth, panel.rules, "other")
    assert (table.cell_type == expected).all()
    assert "DAPI" in table.markers and "DAPI_pos" not in table.markers


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["phenotypes"].append({"type": "treg", "all": ["CD3"]}), "CD3"),
        (lambda d: d["phenotypes"].append({"type": "t_reg", "all": ["CD4"]}), "t_reg"),
        (lambda d: d["markers"].append({"channel": "c9", "marker": "CD4"}), "repeats the marker"),
        (lambda d: d["markers"].append({"channel": "C1", "marker": "CD3"}), "repeats the channel"),
        (lambda d: d["markers"][1].update(compartment="golgi"), "compartment"),
        (lambda d: d.update(nuclear_marker="Hoechst"), "nuclear_marker"),
    ],
)
def test_panel_errors_name_the_entry(change, message):
    import copy

    doc = copy.deepcopy(PANEL)
    change(doc)
    with pytest.raises(PanelError, match=message):
        parse_panel(doc, "panel.yaml")


def test_spillover_is_estimated_and_removed():
    """Channel B sees 6 % of its neighbour A (bright, 30 % of cells positive); B itself is
    dim on its 20 % positive cells, so uncompensated, A's bright cells pass as B+."""
    from cscvision.cells.mif_gating import compensate, spill_coefficient

    rng = np.random.default_rng(3)
    n = 5000
    a_pos, b_pos = rng.uniform(size=n) < 0.3, rng.uniform(size=n) < 0.2
    a = 200 + np.where(
        a_pos, rng.lognormal(np.log(20000), 0.3, n), rng.lognormal(np.log(100), 0.3, n)
    )
    b_true = 200 + np.where(
        b_pos, rng.lognormal(np.log(1500), 0.3, n), rng.lognormal(np.log(100), 0.3, n)
    )
    b = b_true + 0.06 * (a - 200)
    assert spill_coefficient(a, b) == pytest.approx(0.06, abs=0.012)
    assert spill_coefficient(b_true, a) < 0.01  # nothing flows the other way
    fixed, coef = compensate({"A": a, "B": b, "DAPI": a}, ["DAPI", "A", "B"], skip=("DAPI",))
    assert "DAPI>A" not in coef and coef["A>B"] == pytest.approx(0.06, abs=0.012)
    before = (gate(b)[1] == b_pos).mean()
    after = (gate(fixed["B"])[1] == b_pos).mean()
    assert before < 0.95 < 0.99 < after


def test_spillover_of_co_expressed_neighbours_is_estimated_on_the_first_gates_negatives():
    """A (rare, bright: 1.5 % of cells) is only ever on B+ cells (as CD163 on CD68+ cells);
    each spills 6 % into the other. From A's brightest cells the A → B estimate takes B's
    own signal for spill (near the 0.2 cap) and compensation strips B from the A+ cells;
    on cells a first gate calls A+ and B- there is none to take."""
    from cscvision.cells.mif_gating import compensate

    rng = np.random.default_rng(5)
    n = 8000
    a_pos = rng.uniform(size=n) < 0.015
    b_pos = a_pos | (rng.uniform(size=n) < 0.2)
    a_true = 200 + np.where(
        a_pos, rng.lognormal(np.log(8000), 0.3, n), rng.lognormal(np.log(100), 0.3, n)
    )
    b_true = 200 + np.where(
        b_pos, rng.lognormal(np.log(1500), 0.3, n), rng.lognormal(np.log(100), 0.3, n)
    )
    a, b = a_true + 0.06 * (b_true - 200), b_true + 0.06 * (a_true - 200)
    old, coef_old = compensate({"A": a, "B": b}, ["A", "B"])
    assert coef_old["A>B"] > 0.15
    assert gate(old["B"])[1][a_pos].mean() < 0.75  # the old estimate strips B from A+ cells
    first = {"A": gate(a)[1], "B": gate(b)[1]}
    fixed, coef = compensate({"A": a, "B": b}, ["A", "B"], first=first)
    assert coef["B>A"] == pytest.approx(0.06, abs=0.012) and coef["A>B"] < 0.02
    assert (gate(fixed["B"])[1] == b_pos).mean() > 0.99 and gate(fixed["B"])[1][a_pos].all()
    assert (gate(fixed["A"])[1] == a_pos).mean() > 0.99


def test_lineage_markers_keep_the_strongest_call():
    from cscvision.cells.mif_gating import resolve_lineage

    positive = {"CD8": np.array([1, 1, 0, 1], bool), "panCK": np.array([1, 1, 1, 0], bool),
                "FOXP3": np.array([1, 1, 1, 1], bool)}  # fmt: skip
    score = {"CD8": np.array([0.2, 2.0, -1.0, 0.1]), "panCK": np.array([1.5, 0.3, 0.4, -2.0]),
             "FOXP3": np.zeros(4)}  # fmt: skip
    out = resolve_lineage(positive, score, ("CD8", "panCK"))
    assert out["CD8"].tolist() == [False, True, False, True]
    assert out["panCK"].tolist() == [True, False, True, False]
    assert out["FOXP3"].all()  # not a lineage marker: untouched
    fixed = [{**m, "threshold": 1000.0} if m["marker"] != "DAPI" else m for m in PANEL["markers"]]
    panel = parse_panel({**PANEL, "markers": fixed, "lineage": ["CD8", "panCK"]}, "panel.yaml")
    n = 4
    intensity = {m.marker: np.full(n, 10.0) for m in panel.markers}
    intensity["CD8"] = np.array([2000.0, 9000.0, 10.0, 10.0]) * np.ones(n)
    intensity["panCK"] = np.array([9000.0, 2000.0, 10.0, 10.0])
    table, _, _ = phenotype_table(np.zeros(n), np.zeros(n), intensity, panel)
    assert table.cell_type.tolist() == ["tumour", "cd8_t", "other", "other"]
    with pytest.raises(PanelError, match="lineage"):
        parse_panel({**PANEL, "lineage": ["CD3"]}, "panel.yaml")


def test_the_cli_offers_the_gating_methods_with_the_same_default():
    from cscvision.cells.mif_gating import DEFAULT_METHOD, METHODS
    from cscvision.cli.labels_mif import GATING

    assert GATING == METHODS and GATING[0] == DEFAULT_METHOD
