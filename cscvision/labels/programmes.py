"""Gene-programme scores per spot: library-size normalisation, log1p, one score per panel.

Default panels (``configs/st_panels.yaml`` repeats them; replace them there):

- ``stemness`` (cancer-stem-cell markers): CD44 (Al-Hajj et al., PNAS 2003), PROM1/CD133
  (Singh et al., Nature 2004), ALDH1A1 (Ginestier et al., Cell Stem Cell 2007), and the
  embryonic-stem-cell core SOX2, NANOG, POU5F1/OCT4 (Ben-Porath et al., Nat Genet 2008)
  with KLF4 (Takahashi & Yamanaka, Cell 2006).
- ``immunosuppressive`` (immunosuppressive tumour microenvironment): regulatory T cells
  FOXP3, CTLA4 (Sakaguchi et al., Cell 2008); M2-like macrophages CD163, MRC1/CD206
  (Mantovani et al., Trends Immunol 2002); the cytokines IL10 and TGFB1; myeloid ARG1
  (Gabrilovich & Nagaraj, Nat Rev Immunol 2009); IDO1 (Munn & Mellor, J Clin Invest 2007);
  CD274/PD-L1 (Dong et al., Nat Med 2002).

Marker panels are a convention, not a measurement of the biology: several of these genes
are expressed by other cells (CD44 by lymphocytes, KLF4 by epithelium), so a panel score is
a hypothesis to check against pathology, not a label to trust blindly.

Scores: ``score_genes`` is ``scanpy.tl.score_genes`` (the panel's mean minus the mean of
expression-matched control genes, Tirosh et al., Science 2016); ``zscore`` is the mean over
the panel's genes of each gene's z-score across the sample's spots.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cscvision.core.panels import DEFAULT_PANELS
from cscvision.labels.st import STError, require_module

METHODS = ("score_genes", "zscore")
MIN_GENES = 2


@dataclass(frozen=True)
class ProgrammeConfig:
    """How spots become panel scores and tiles (``cscvision labels st --panels CONFIG``)."""

    panels: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(DEFAULT_PANELS))
    method: str = "score_genes"  # score_genes | zscore
    target_sum: float = 1e4  # counts per spot after library-size normalisation
    ctrl_size: int = 50  # control genes per panel gene bin (score_genes)
    n_bins: int = 25  # expression bins for matching control genes (score_genes)
    seed: int = 0
    tile_px: int = 224  # tile side in pixels at mpp, centred on each spot
    mpp: float = 0.5
    binarize_quantile: float | None = None  # e.g. 0.75: adds <panel>_high = score ≥ quantile

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r}: choose one of {', '.join(METHODS)}")
        if not self.panels:
            raise ValueError("panels: name at least one panel of genes")
        q = self.binarize_quantile
        if q is not None and not 0 < q < 1:
            raise ValueError(f"binarize_quantile must lie in (0, 1), got {q}")
        if self.tile_px < 8 or self.mpp <= 0 or self.target_sum <= 0:
            raise ValueError("tile_px ≥ 8, mpp > 0 and target_sum > 0 required")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> ProgrammeConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise STError(f"{source}: unknown key(s) {unknown}; valid: {sorted(known)}")
        values = dict(data)
        if "panels" in values:
            panels = values["panels"]
            if not isinstance(panels, Mapping) or not all(
                isinstance(g, (list, tuple)) for g in panels.values()
            ):
                raise STError(f"{source}: panels maps each panel name to a list of genes")
            values["panels"] = {str(k): tuple(str(g) for g in v) for k, v in panels.items()}
        try:
            return cls(**values)
        except (TypeError, ValueError) as e:
            raise STError(f"{source}: {e}") from None


def load_programme_config(path: str | None) -> ProgrammeConfig:
    """The config at ``path`` (YAML; a packaged config's name such as ``st_panels`` works
    too), or the defaults when ``path`` is None."""
    if path is None:
        return ProgrammeConfig()
    from cscvision.core.config_files import read_yaml
    from cscvision.core.resources import packaged_dir

    packaged = packaged_dir("configs") / f"{Path(path).name.removesuffix('.yaml')}.yaml"
    if not Path(path).exists() and packaged.exists():
        path = str(packaged)

    data = read_yaml(path) or {}  # a ConfigFileError (ValueError) naming the file; aliases bounded
    return ProgrammeConfig.from_dict(data, source=str(path))


def _ensembl_hint(names: Sequence[str]) -> str:
    """A hint when the matrix names its features by Ensembl id (ENSG…, ENSMUSG…)."""
    ensembl = [n for n in names[:200] if n.upper().startswith("ENS") and n[3:4].isalpha()]
    if names and len(ensembl) > len(names[:200]) / 2:
        return f"; this matrix names genes by Ensembl id, e.g. {ensembl[0]}: list those"
    return ""


def match_genes(
    panels: Mapping[str, Sequence[str]], var_names: Sequence[str], source: str = ""
) -> dict[str, list[str]]:
    """Each panel's genes found in ``var_names`` (exact, else case-insensitive match).

    Warns once listing every absent gene; raises :class:`STError` naming the panel and its
    genes when fewer than two of a panel's genes are present.
    """
    names = list(var_names)
    exact = set(names)
    by_upper = {n.upper(): n for n in reversed(names)}
    found: dict[str, list[str]] = {}
    absent: dict[str, list[str]] = {}
    for panel, genes in panels.items():
        hits = [g if g in exact else by_upper.get(g.upper()) for g in genes]
        found[panel] = [h for h in hits if h is not None]
        absent[panel] = [g for g, h in zip(genes, hits, strict=True) if h is None]
        if len(found[panel]) < MIN_GENES:
            raise STError(
                f"{source}: panel {panel!r} has {len(found[panel])} of its genes in the data "
                f"(needs ≥ {MIN_GENES}); absent: {', '.join(absent[panel])}; present: "
                f"{', '.join(found[panel]) or 'none'}. Check the gene symbols (the panel "
                "config's genes must match the matrix's feature names"
                f"{_ensembl_hint(names)})"
            )
    missing = {p: g for p, g in absent.items() if g}
    if missing:
        listing = "; ".join(f"{p}: {', '.join(g)}" for p, g in missing.items())
        warnings.warn(
            f"{source}: genes absent from the data (scored without): {listing}", stacklevel=2
        )
    return found


def normalise(adata: Any, target_sum: float) -> Any:
    """A copy of ``adata`` with counts scaled to ``target_sum`` per spot, then log1p."""
    sc = require_module("scanpy")
    out = adata.copy()
    sc.pp.normalize_total(out, target_sum=target_sum)
    sc.pp.log1p(out)
    return out


def _zscore(adata: Any, genes: Sequence[str]) -> np.ndarray:
    x = adata[:, list(genes)].X
    x = np.asarray(x.toarray() if hasattr(x, "toarray") else x, np.float64)
    sd = x.std(axis=0)
    z = np.where(sd > 0, (x - x.mean(axis=0)) / np.where(sd > 0, sd, 1.0), 0.0)
    return z.mean(axis=1)


def score_programmes(
    adata: Any, config: ProgrammeConfig, source: str = ""
) -> tuple[np.ndarray, dict[str, list[str]]]:
    """Gene-programme scores of every spot of a sample.

    Counts are library-size normalised and log1p'd, then each panel is scored by
    ``scanpy.tl.score_genes`` or by the mean of per-gene z-scores, as ``config`` says.

    Parameters
    ----------
    adata
        Spots × genes raw counts (``STSample.adata``).
    config
        The panels and the scoring method.
    source
        What to call the sample in warnings and errors.

    Returns
    -------
    tuple[numpy.ndarray, dict[str, list[str]]]
        Scores float32[N, P] (panels in config order) and the genes each panel used.

    Raises
    ------
    STError
        A panel with fewer than 2 of its genes in the matrix (the message names the panel
        and its genes).

    Examples
    --------
    >>> scores, used = cscvision.score_programmes(sample.adata, cscvision.ProgrammeConfig())
    """
    sc = require_module("scanpy")
    genes = match_genes(config.panels, adata.var_names, source)
    data = normalise(adata, config.target_sum)
    scores = np.zeros((data.n_obs, len(genes)), np.float32)
    for j, used in enumerate(genes.values()):
        if config.method == "zscore":
            scores[:, j] = _zscore(data, used)
            continue
        sc.tl.score_genes(
            data,
            used,
            ctrl_size=config.ctrl_size,
            n_bins=config.n_bins,
            random_state=config.seed,
            score_name="_cscvision_score",
        )
        scores[:, j] = data.obs["_cscvision_score"].to_numpy(np.float32)
    return scores, genes
