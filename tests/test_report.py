"""`cscvision report`: a static page over a batch (and a training run), offline and portable."""

from __future__ import annotations

import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest

from cscvision.cli import main
from cscvision.views.plots import null_figures
from cscvision.views.report import write_report


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs, self.hrefs, self.cards, self.scripts = [], [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.srcs.append(a["src"])
        if tag in ("a", "link") and "href" in a:
            self.hrefs.append(a["href"])
        if tag == "script":
            self.scripts.append(a.get("src"))
        if tag == "article" and "slide-card" in a.get("class", ""):
            self.cards.append(a["id"])


@pytest.fixture(scope="module")
def report(demo_batch, tmp_path_factory):
    out = tmp_path_factory.mktemp("rep") / "infer"
    shutil.copytree(demo_batch["out"], out)
    assert main(["report", str(out), "--cohort", str(demo_batch["cohort"]),
                 "--model", str(demo_batch["model"])]) == 0  # fmt: skip
    return out / "report" / "index.html"


def parsed(page: Path) -> Links:
    links = Links()
    links.feed(page.read_text(encoding="utf-8"))
    return links


def test_report_has_every_slide_card_and_the_failed_slide(report, demo_batch):
    links = parsed(report)
    ids = sorted(Path(s).stem for s in demo_batch["slides"])
    assert links.cards == [f"slide-{i}" for i in ids]
    html = report.read_text(encoding="utf-8")
    assert "broken" in html and "Failed slides" in html
    assert "synthetic slides only" in html  # the demo model's honesty travels into the report
    table = html[html.index("cohort-table") : html.index("</table>", html.index("cohort-table"))]
    assert all(i in table for i in ids) and table.count("<tr>") == len(ids) + 1
    assert "patient_id" in table  # grouped by the cohort's patients


def test_report_is_offline_and_survives_being_copied(report, tmp_path):
    moved = tmp_path / "elsewhere"
    shutil.copytree(report.parent, moved)
    links = parsed(moved / "index.html")
    local = [s for s in links.srcs + links.scripts + links.hrefs if s and not s.startswith("#")]
    assert not [u for u in local if re.match(r"^(https?:)?//", u)], "no network resources"
    for src in links.srcs + links.scripts:
        assert (moved / src).is_file(), src
    assert any(s.endswith("scatter.svg") for s in links.srcs)
    assert any(s.endswith("overlay_stemness.png") for s in links.srcs)


def test_report_of_a_non_output_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "is this the --out folder of cscvision infer" in capsys.readouterr().err


def test_null_figures_are_found_wherever_they_sit():
    summary = {
        "a": {"observed": 1.0, "null_mean": 0.5},
        "b": {"c": {"observed": 2, "null_mean": 1}},
    }
    assert [n for n, _ in null_figures(summary)] == ["a", "b.c"]


def test_training_run_section(demo_batch, tmp_path):
    run = tmp_path / "run"
    (run / "logs/csv/version_0").mkdir(parents=True)
    (run / "metrics.json").write_text(
        '{"val": {"auroc_stemness": 0.9}, "test": {"auroc_stemness": 0.8}}'
    )
    (run / "logs/csv/version_0/metrics.csv").write_text(
        "epoch,step,train_loss,val_loss,val_auroc_stemness\n0,1,0.7,,\n0,1,,0.6,0.7\n1,2,0.5,,\n1,2,,0.4,0.85\n"
    )
    out = tmp_path / "infer"
    shutil.copytree(demo_batch["out"], out)
    page = write_report(out, run_dir=run)
    html = page.read_text(encoding="utf-8")
    assert "Training run" in html and "0.8" in html
    svg = (page.parent / "assets" / "learning_curves.svg").read_text()
    assert "<svg" in svg and "val_auroc_stemness" in svg


def test_plots_show_maps_without_thresholds_by_their_own_value():
    from cscvision.views.plots import distribution_svg, scatter_svg, slide_value

    thresholded = {"targets": {"a": {"fraction_of_tissue": 0.25, "mean": 0.4}}}
    regression = {"targets": {"a": {"unit": "cells/mm²", "mean": 812.5}}}
    mil = {"targets": {"a": {"mean": 0.5}}, "slide_prediction": {"regression": {"a": 3.5}}}
    assert slide_value(thresholded, "a") == (0.25, "fraction of tissue")
    assert slide_value(regression, "a") == (812.5, "mean over tissue (cells/mm²)")
    assert slide_value(mil, "a") == (3.5, "slide prediction")  # not the percentile map's 0.5
    assert slide_value({"targets": {"a": {}}}, "a")[1] == ""
    two = [{"targets": {t: {"unit": "u", "mean": m + i} for t in "ab"}} for i, m in
           enumerate((100.0, 900.0, 400.0))]  # fmt: skip
    svg = scatter_svg(two, ["a", "b"], ["P1", "P2", "P3"])
    assert svg is not None and "mean over tissue (u)" in svg  # was an empty 0-1 plot
    assert distribution_svg([{"targets": {"a": {}}}], ["a"]) is None  # nothing to draw
