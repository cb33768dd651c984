"""Cohorts of tile-label tables (``label_path`` in the cohort CSV): which targets to train,
and whether their values suit the target type. The tables' tiles become samples in
:func:`cscvision.training.tilecache.table_tiles`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cscvision.labels.cohort import CohortEntry
from cscvision.labels.table import (
    LabelTableError,
    declared_targets,
    read_sidecar,
    sidecar_path,
)
from cscvision.training.tilecache import DataError


def cohort_targets(
    entries: Sequence[CohortEntry], requested: Sequence[str] | None
) -> tuple[str, ...] | None:
    """The targets to train on when the cohort has tile-label tables, else None.

    ``requested`` (config ``targets``) picks columns; by default the first table's declared
    training targets (its sidecar's ``label_targets``, else all its columns). Every table
    must hold them.
    """
    tables = [e for e in entries if e.label_path is not None]
    if not tables:
        return tuple(requested) if requested else None
    if len(tables) != len(entries):
        plain = next(e.slide_id for e in entries if e.label_path is None)
        raise DataError(
            f"slide {plain!r} has no label_path while others do; give every slide of the "
            "cohort a tile-label table, or none"
        )
    found, declared = {}, {}
    for e in tables:
        try:
            meta = read_sidecar(e.label_path)
            found[e.slide_id], declared[e.slide_id] = meta["targets"], declared_targets(meta)
        except LabelTableError as err:
            raise DataError(str(err)) from None
        except (OSError, KeyError, ValueError) as err:
            raise DataError(
                f"{sidecar_path(e.label_path)}: cannot read its targets ({err})"
            ) from None
    targets = tuple(requested) if requested else tuple(declared[tables[0].slide_id])
    for e in tables:
        missing = [t for t in targets if t not in found[e.slide_id]]
        if missing:
            raise DataError(
                f"{e.label_path}: lacks target(s) {missing} (has {found[e.slide_id]}); set the "
                "config's targets to columns every table has"
            )
    return targets


def check_target_range(by_split: dict, targets: Sequence[str], target_type: str) -> None:
    """Classification trains on fractions in [0, 1]; other values need ``target_type:
    regression``."""
    if target_type != "classification":
        return
    for tiles in by_split.values():
        for t in tiles:
            bad = (t.targets < 0) | (t.targets > 1)
            if bad.any():
                name = targets[int(np.argwhere(bad)[0][1])]
                raise DataError(
                    f"slide {t.slide_id}: target {name!r} has values outside [0, 1] "
                    f"(e.g. {float(t.targets[bad][0]):.3g}); set target_type: regression to learn "
                    "continuous scores, or train on binarised columns (<panel>_high)"
                )
