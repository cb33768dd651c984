"""Feature stores: one HDF5 file per slide holding every tile's embedding.

=======================  ===============================================================
``xy_l0``                int32 [N, 2]: level-0 top-left corner of each tile
``features``             float16 [N, D]: the encoder's pooled embedding of each tile
attribute ``encoder``    registry name of the encoder (``cscvision encoders``)
``weights_sha256``       sha256 of the weights file the features came from
``grid``                 JSON: tile px, µm/px, level, downsample, read px, stride, overlap,
                         tissue threshold, tissue-mask µm/px (the read plan of the tiles)
``slide_id``,            the slide, as given, and its level-0 µm/px
``slide_path``,
``slide_mpp``
``cscvision_version``    the version that wrote the file
=======================  ===============================================================

Written under a temporary name and renamed (:func:`cscvision.core.io.atomic_path`), so a
file that exists is complete. ``read_feature_store(path)`` returns a frozen
:class:`FeatureStore` with the arrays in memory; heads and MIL models read nothing else.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cscvision import __version__
from cscvision.core.errors import CscvisionError
from cscvision.core.io import atomic_path
from cscvision.models.registry import FEATURES_INSTALL

STORE_SUFFIX = ".h5"


class FeatureStoreError(CscvisionError, ValueError):
    """A feature store that is missing, unreadable or not what it is asked to be."""


@dataclass(frozen=True)
class FeatureStore:
    """One slide's tile embeddings and where they came from."""

    xy_l0: np.ndarray  # int32 [N, 2], level-0 top-left corners
    features: np.ndarray  # float16 [N, D]
    encoder: str
    weights_sha256: str
    grid: dict[str, Any] = field(default_factory=dict)
    slide_id: str = ""
    slide_path: str = ""
    slide_mpp: float = 0.0
    cscvision_version: str = __version__

    def __len__(self) -> int:
        return len(self.xy_l0)

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def rows_of(self, xy_l0: np.ndarray) -> np.ndarray:
        """Row of each level-0 ``xy`` in this store (int64 [M]); -1 where it has none."""
        want = np.asarray(xy_l0, np.int64).reshape(-1, 2)
        keys = _keys(self.xy_l0)
        order = np.argsort(keys, kind="stable")
        found = np.searchsorted(keys, _keys(want), sorter=order)
        found = np.clip(found, 0, max(len(keys) - 1, 0))
        rows = order[found] if len(keys) else np.zeros(len(want), np.int64)
        hit = len(keys) > 0 and keys[rows] == _keys(want)
        return np.where(hit, rows, -1).astype(np.int64)


def _keys(xy: np.ndarray) -> np.ndarray:
    xy = np.asarray(xy, np.int64).reshape(-1, 2)
    return xy[:, 0] * (1 << 32) + xy[:, 1]


def import_h5py() -> Any:
    try:
        import h5py
    except ImportError:
        raise FeatureStoreError(
            f"feature stores need h5py, which is not installed here: {FEATURES_INSTALL}"
        ) from None
    return h5py


def write_feature_store(path: str | Path, store: FeatureStore) -> Path:
    """Write a feature store (HDF5) atomically.

    Parameters
    ----------
    path
        The file to write.
    store
        The store.

    Returns
    -------
    pathlib.Path
        ``path``.

    Examples
    --------
    >>> cscvision.write_feature_store("features/S01.h5", store)
    """
    h5py = import_h5py()
    xy = np.asarray(store.xy_l0)
    feats = np.asarray(store.features)
    if xy.ndim != 2 or xy.shape[1] != 2 or feats.ndim != 2 or len(feats) != len(xy):
        raise FeatureStoreError(
            f"{path}: need xy_l0 [N, 2] and features [N, D], got {xy.shape} and {feats.shape}"
        )
    # The HDF5 file is built in memory and written with plain file I/O: a full disk or a
    # failing device is an OSError here, never an HDF5 error inside the library (which
    # could end the process with a segmentation fault).
    image = io.BytesIO()
    with h5py.File(image, "w") as f:
        f.create_dataset("xy_l0", data=xy.astype(np.int32))
        f.create_dataset("features", data=feats.astype(np.float16), chunks=True)
        f.attrs["encoder"] = store.encoder
        f.attrs["weights_sha256"] = store.weights_sha256
        f.attrs["grid"] = json.dumps(store.grid, sort_keys=True)
        f.attrs["slide_id"] = store.slide_id
        f.attrs["slide_path"] = store.slide_path
        f.attrs["slide_mpp"] = float(store.slide_mpp)
        f.attrs["cscvision_version"] = store.cscvision_version
    try:
        with atomic_path(path) as tmp, tmp.open("wb") as out:
            out.write(image.getbuffer())
            out.flush()
            os.fsync(out.fileno())
    except OSError as e:
        raise FeatureStoreError(
            f"{path}: cannot write the feature store ({e.strerror or e}); free space "
            f"({image.getbuffer().nbytes / 2**20:.1f} MiB needed) or choose another --out, "
            "then re-run"
        ) from None
    return Path(path)


def read_store_attrs(path: str | Path) -> dict[str, Any]:
    """The attributes of a store (cheap: no arrays), with ``n_tiles`` and ``dim``."""
    h5py = import_h5py()
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: _plain(v) for k, v in f.attrs.items()}
            attrs["n_tiles"], attrs["dim"] = (int(n) for n in f["features"].shape)
    except (OSError, KeyError) as e:
        raise FeatureStoreError(f"{path}: not a readable cscvision feature store ({e})") from None
    attrs["grid"] = json.loads(attrs.get("grid") or "{}")
    return attrs


def _plain(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else getattr(value, "item", lambda: value)()


def read_feature_store(path: str | Path) -> FeatureStore:
    """Read a feature store (one slide's tile embeddings) into memory.

    Parameters
    ----------
    path
        The HDF5 store (``<slide_id>.h5``).

    Returns
    -------
    FeatureStore
        ``xy_l0`` int32[N, 2], ``features`` float16[N, D], the encoder, weights digest, grid
        and slide it was made from.

    Raises
    ------
    FeatureStoreError
        The file is missing, not HDF5, or lacks a dataset or attribute.

    Examples
    --------
    >>> store = cscvision.read_feature_store("features/S01.h5")
    >>> store.features.shape, store.encoder
    """
    h5py = import_h5py()
    attrs = read_store_attrs(path)
    with h5py.File(path, "r") as f:
        xy, feats = f["xy_l0"][()], f["features"][()]
    return FeatureStore(
        xy_l0=np.asarray(xy, np.int32),
        features=np.asarray(feats, np.float16),
        encoder=str(attrs.get("encoder", "")),
        weights_sha256=str(attrs.get("weights_sha256", "")),
        grid=attrs["grid"],
        slide_id=str(attrs.get("slide_id", "")),
        slide_path=str(attrs.get("slide_path", "")),
        slide_mpp=float(attrs.get("slide_mpp", 0.0)),
        cscvision_version=str(attrs.get("cscvision_version", "")),
    )


def store_matches(
    path: str | Path, *, encoder: str, weights_sha256: str, grid: dict[str, Any] | None = None
) -> bool:
    """True when ``path`` is a complete store of this encoder and weights whose grid has
    every item of ``grid`` (tile px, µm/px, tissue threshold, ...)."""
    if not Path(path).is_file():
        return False
    try:
        attrs = read_store_attrs(path)
    except FeatureStoreError:
        return False
    same = attrs.get("encoder") == encoder and attrs.get("weights_sha256") == weights_sha256
    want = json.loads(json.dumps(grid or {}))
    return same and all(attrs["grid"].get(k) == v for k, v in want.items())


def check_bag(path: str | Path, slide_id: str, store: FeatureStore) -> FeatureStore:
    """``store`` if it can be ``slide_id``'s bag: tiles, finite features, and its own
    ``slide_id`` attribute (when it has one) naming that slide; else
    :class:`FeatureStoreError` naming the file and the fix."""
    if len(store) == 0 or store.features.ndim != 2 or store.features.shape[1] == 0:
        raise FeatureStoreError(
            f"{path}: no tiles (features {store.features.shape}); re-run cscvision features "
            "on the slide (lower --min-tissue if it has little tissue), or drop it from the "
            "cohort"
        )
    bad = ~np.isfinite(store.features).all(axis=1)
    if bad.any():
        raise FeatureStoreError(
            f"{path}: {int(bad.sum())} of {len(store)} tiles have NaN or infinite features "
            f"(first at x, y {tuple(int(v) for v in store.xy_l0[np.argmax(bad)])}); re-run "
            "cscvision features --overwrite on the slide"
        )
    if store.slide_id and store.slide_id != slide_id:
        raise FeatureStoreError(
            f"{path}: attribute slide_id is {store.slide_id!r}, not {slide_id!r} (a store "
            "copied under another slide's name?); run cscvision features on the slide of "
            f"{slide_id!r}, or fix the cohort row"
        )
    return store


def check_same_source(stores: list[tuple[Path, FeatureStore]]) -> None:
    """Refuse stores of one cohort made by different encoders or weights, on different grids,
    or of different widths: :class:`FeatureStoreError` naming a file of each side."""
    if not stores:
        return
    first_path, first = stores[0]
    for path, store in stores[1:]:
        for what, a, b in (
            ("encoder", first.encoder, store.encoder),
            ("weights_sha256", first.weights_sha256, store.weights_sha256),
            ("feature dimension", first.dim, store.dim),
            ("grid", first.grid, store.grid),
        ):
            if a != b:
                raise FeatureStoreError(
                    f"{path}: {what} {b!r} differs from {first_path}'s {a!r}: the stores of "
                    "one cohort must come from one encoder, one weights file and one grid; "
                    "re-run cscvision features with the same encoder and flags on every slide"
                )
