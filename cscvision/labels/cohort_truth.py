"""Truth files beside a cohort: what is truly there, for scoring a model against it.

The layout (``docs/reference/truth-layout.md``) is what ``scripts/eval_st.py --cohort`` and
``scripts/eval_mil.py --cohort`` read, so a cohort made by other code is scored the same
way as a ``cscvision synth`` cohort, which ``--write-truth`` writes in it::

    COHORT/truth/slides.csv             slide_id,<target>,...   true share of tissue per slide
    COHORT/truth/spots/<slide_id>.csv   barcode,<target>,...    true fraction of each spot
    COHORT/truth/tiles/<slide_id>.csv   x,y,<target>,...        true fraction of each tile

Values are fractions in [0, 1]; ``x, y`` are level-0 top-left corners (int). Every file is
optional: a script scores what it finds and says what it lacks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cscvision.core.errors import CscvisionError
from cscvision.core.io import read_csv, write_csv

TRUTH_DIR = "truth"
SLIDES_CSV = "slides.csv"


class TruthError(CscvisionError, ValueError):
    """A truth file that is missing, malformed or out of range."""


@dataclass(frozen=True)
class TruthTable:
    """Rows of one truth file: their keys (slide ids, barcodes or level-0 ``x, y``), the
    target names and float64[N, T] values."""

    path: Path
    keys: np.ndarray  # str[N] or int64[N, 2]
    targets: tuple[str, ...]
    values: np.ndarray

    def column(self, target: str) -> np.ndarray:
        if target not in self.targets:
            raise TruthError(
                f"{self.path}: no column {target!r} (has {list(self.targets)}); add the "
                "true fraction of each row under that name"
            )
        return self.values[:, self.targets.index(target)]

    def lookup(self, keys: Sequence[str]) -> np.ndarray:
        """float64[len(keys), T]: each key's row, NaN where the file has none."""
        index = {str(k): i for i, k in enumerate(self.keys)}
        rows = np.array([index.get(str(k), -1) for k in keys], np.int64)
        out = np.full((len(rows), len(self.targets)), np.nan)
        out[rows >= 0] = self.values[rows[rows >= 0]]
        return out

    def at(self, xy_l0: np.ndarray) -> np.ndarray:
        """float64[N, T] for tiles at ``xy_l0`` int[N, 2]: NaN where the file has none."""
        return self.lookup([f"{x},{y}" for x, y in np.asarray(xy_l0, np.int64)])


def truth_dir(cohort_dir: str | Path) -> Path:
    return Path(cohort_dir) / TRUTH_DIR


def spots_path(cohort_dir: str | Path, slide_id: str) -> Path:
    return truth_dir(cohort_dir) / "spots" / f"{slide_id}.csv"


def tiles_path(cohort_dir: str | Path, slide_id: str) -> Path:
    return truth_dir(cohort_dir) / "tiles" / f"{slide_id}.csv"


def _read(path: Path, key_columns: tuple[str, ...]) -> TruthTable:
    if not path.is_file():
        raise TruthError(f"{path}: no such truth file; write it (docs: reference/truth-layout)")
    rows = read_csv(path)
    header = list(rows[0]) if rows else []
    if header[: len(key_columns)] != list(key_columns) or len(header) <= len(key_columns):
        raise TruthError(
            f"{path}: header {header} must start with {list(key_columns)} and then name at "
            "least one target"
        )
    targets = tuple(header[len(key_columns) :])
    values = np.full((len(rows), len(targets)), np.nan)
    for i, row in enumerate(rows):
        for j, t in enumerate(targets):
            try:
                values[i, j] = float(row[t])
            except (TypeError, ValueError):
                raise TruthError(f"{path}: line {i + 2}: {t} {row[t]!r} is not a number") from None
    bad = ~np.isfinite(values) | (values < 0) | (values > 1)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise TruthError(
            f"{path}: line {i + 2}: {targets[j]} {values[i, j]} is not a fraction in [0, 1]"
        )
    keys = np.array([",".join(str(row[k]).strip() for k in key_columns) for row in rows])
    if len(set(keys.tolist())) < len(keys):
        raise TruthError(f"{path}: a {'/'.join(key_columns)} is listed twice; keep one row each")
    return TruthTable(path, keys, targets, values)


def read_slide_truth(cohort_dir: str | Path) -> TruthTable:
    """``truth/slides.csv``: each slide's true share of tissue per target."""
    return _read(truth_dir(cohort_dir) / SLIDES_CSV, ("slide_id",))


def read_spot_truth(cohort_dir: str | Path, slide_id: str) -> TruthTable:
    """``truth/spots/<slide_id>.csv``: each spot's true fraction per target, by barcode."""
    return _read(spots_path(cohort_dir, slide_id), ("barcode",))


def read_tile_truth(cohort_dir: str | Path, slide_id: str) -> TruthTable | None:
    """``truth/tiles/<slide_id>.csv`` (keys ``"x,y"``), or None when the cohort has none."""
    path = tiles_path(cohort_dir, slide_id)
    return _read(path, ("x", "y")) if path.is_file() else None


def _fraction(v: float) -> str:
    return f"{float(v):.6f}"


def write_slide_truth(
    cohort_dir: str | Path, targets: Sequence[str], shares: Mapping[str, Sequence[float]]
) -> Path:
    """``truth/slides.csv`` from ``{slide_id: [share per target]}``."""
    rows = [[sid, *map(_fraction, v)] for sid, v in shares.items()]
    return write_csv(truth_dir(cohort_dir) / SLIDES_CSV, ["slide_id", *targets], rows)


def write_spot_truth(
    cohort_dir: str | Path,
    slide_id: str,
    barcodes: Sequence[str],
    targets: Sequence[str],
    values: np.ndarray,
) -> Path:
    """``truth/spots/<slide_id>.csv``: one row per barcode, float[N, T] ``values``."""
    rows = [[b, *map(_fraction, v)] for b, v in zip(barcodes, values, strict=True)]
    return write_csv(spots_path(cohort_dir, slide_id), ["barcode", *targets], rows)


def write_tile_truth(
    cohort_dir: str | Path,
    slide_id: str,
    xy_l0: np.ndarray,
    targets: Sequence[str],
    values: np.ndarray,
) -> Path:
    """``truth/tiles/<slide_id>.csv``: one row per tile (level-0 top-left ``x, y``)."""
    xy = np.asarray(xy_l0, np.int64)
    rows = [[int(x), int(y), *map(_fraction, v)] for (x, y), v in zip(xy, values, strict=True)]
    return write_csv(tiles_path(cohort_dir, slide_id), ["x", "y", *targets], rows)
