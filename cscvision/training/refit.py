"""An OOD record added to a model exported without one, its weights untouched: the run's
tiles are made again as training made them (``scripts/refit_ood.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cscvision.models.card import ModelCard
from cscvision.models.export import load_model
from cscvision.training.confidence import export_confidence
from cscvision.training.ood import export_run_ood


def refit_ood(
    cfg: Any,
    model_dir: str | Path,
    *,
    progress: bool = True,
    features: str | None = None,
    reference: str = "validation",
) -> ModelCard:
    """Add an OOD record and confidence thresholds to the model ``model_dir`` that ``cfg``
    trained, as ``train`` now does at export: the run's tiles are made again as training
    made them (same cohort, split, grid, subsampling and seed), the weights file is left
    as it is. ``reference``: the slides the OOD thresholds come from
    (:func:`~cscvision.training.ood.export_run_ood`)."""
    from cscvision.labels.annotations import DEFAULT_CLASS_MAP, ClassMap
    from cscvision.labels.cohort import read_cohort
    from cscvision.models.kinds import kind_of_config, resolve
    from cscvision.training.data import prepare_cohort, stain_sources_of
    from cscvision.training.tables import cohort_targets
    from cscvision.training.train import _splits

    kind = kind_of_config(cfg)
    if kind.slide_level:  # MIL: the record on its tile embeddings, from the stored bags
        return refit_mil_ood(cfg, model_dir, progress=progress)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    class_map = ClassMap.from_dict(cfg.classes) if cfg.classes else DEFAULT_CLASS_MAP
    entries = read_cohort(cfg.cohort.csv)
    targets = cohort_targets(entries, cfg.targets) or class_map.targets
    splits = _splits(run_dir / "splits.csv", entries, cfg, class_map)
    by_split = prepare_cohort(
        entries, splits, spec=cfg.grid, class_map=class_map,
        cache_dir=Path(cfg.data.cache_dir or run_dir / "cache"), progress=progress,
        targets=targets,
    )  # fmt: skip
    dm, _, _ = resolve(kind.pieces)(cfg, targets, by_split, run_dir, progress)
    model = load_model(model_dir)
    note = _check_same_tiles(model.card, dm.summary(), model.path)
    card = export_run_ood(
        model.net, model.card, dm, model.path, note=note, features=features, reference=reference
    )
    sources = stain_sources_of(dm, card.stain)
    return export_confidence(model.net, card, dm._loader("val"), model.path, stain_sources=sources)


def _check_same_tiles(card: ModelCard, summary: dict, model_dir: Path) -> str:
    """The tiles made again must be those the model was trained on: same slides per split
    and tile counts within 2 % of those its card records (tissue detection may have moved
    a few tiles since), else the record would describe other data. Returns a note of
    the counts for the card."""
    recorded = card.training.get("cohort", {})
    notes = []
    for split in ("train", "val"):
        want, got = recorded.get(split, {}), summary.get(split, {})
        if not want:
            continue
        near = abs(got.get("tiles", 0) - want.get("tiles", 0)) <= 0.02 * want.get("tiles", 0)
        if want.get("slides") != got.get("slides") or not near:
            raise ValueError(
                f"{model_dir}: its card's {split} split has {want.get('slides')} slides and "
                f"{want.get('tiles')} tiles but the cohort made again gives "
                f"{got.get('slides')} and {got.get('tiles')}; pass the config and cohort it "
                "was trained with"
            )
        notes.append(f"{split} {got.get('tiles')} tiles (card: {want.get('tiles')})")
    return "refitted after export on the training cohort made again: " + ", ".join(notes)


def attach_stain(model_dir: str | Path, reference: Any) -> ModelCard:
    """Store a stain normalisation template (:class:`~cscvision.slides.stain.StainReference`)
    in an exported model's card: inference then applies it to every tile, unasked. The
    weights are untouched; use it for the template the model was trained with."""
    import json

    from cscvision.core.io import write_json
    from cscvision.models.card import CARD_FILE, read_card

    path = Path(model_dir) / CARD_FILE
    raw = json.loads(path.read_text())
    write_json(path, {**raw, "stain": reference.to_dict()})
    return read_card(model_dir)


def refit_mil_ood(cfg, model_dir: str | Path, *, progress: bool = True) -> ModelCard:
    """Add the record to a MIL model exported without one (its weights untouched), from the
    run that trained it (``cfg``: its config; the stored feature stores are reused, missing
    ones extracted again). Refused when the bags differ from the tiles its card records."""
    from cscvision.training.featuredata import _extractor, with_encoder_grid
    from cscvision.training.mil_ood import export_mil_ood
    from cscvision.training.mil_train import labelled_slides, slide_bags

    cfg = with_encoder_grid(cfg)
    model = load_model(model_dir)
    entries, labels = labelled_slides(cfg)
    features_dir = Path(cfg.model.features_dir or Path(cfg.run_dir) / "features")
    bags = slide_bags(cfg, entries, _extractor(cfg), features_dir, progress=progress)
    recorded = model.card.training.get("cohort", {})
    got = {"slides": len(bags), "tiles": sum(len(b.features) for b in bags)}
    if {k: recorded.get(k) for k in got} != got:
        raise ValueError(
            f"{model_dir}: its card records {recorded.get('slides')} slides and "
            f"{recorded.get('tiles')} tiles but the config's cohort gives {got['slides']} and "
            f"{got['tiles']}; pass the config and cohort it was trained with"
        )
    return export_mil_ood(model.net.mil, model.card, bags, labels.patient_ids, model.path,
                          seed=cfg.seed)  # fmt: skip
