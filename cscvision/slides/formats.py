"""What a slide on disk is, before OpenSlide reads it: DICOM WSI folders, plausible headers.

A DICOM WSI is a folder of ``.dcm`` files (one per level, plus label and overview); OpenSlide
opens it from any one of them. A header is believed only when the file can hold the
pixels it claims (:data:`~cscvision.slides.info.MIN_BYTES_PER_MEGAPIXEL`).
"""

from __future__ import annotations

from pathlib import Path

import openslide

from cscvision.slides.info import MIN_BYTES_PER_MEGAPIXEL, SlideError


def dicom_files(folder: str | Path) -> list[Path]:
    """The ``.dcm`` files directly in ``folder`` (a DICOM WSI is a folder of them), sorted."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() == ".dcm" and p.is_file())


def open_dicom_folder(folder: str) -> openslide.AbstractSlide:
    """OpenSlide opens a DICOM WSI from any of its files and finds the rest beside it."""
    files = dicom_files(folder)
    if not files:
        raise SlideError(
            f"{folder}: a folder is a slide only when it holds the .dcm files of one DICOM "
            "WSI, and this one holds none; pass the slide files inside it instead"
        )
    for file in files:
        try:
            return openslide.OpenSlide(str(file))
        except openslide.OpenSlideError:
            continue
    raise SlideError(f"{folder}: OpenSlide opens none of its {len(files)} .dcm files as a WSI")


def stored_bytes(path: str) -> int | None:
    """Bytes holding the slide's pixels; None for index files whose data lie elsewhere."""
    p = Path(path)
    if p.is_dir() or p.suffix.lower() == ".dcm":  # a DICOM WSI: all its files count
        return sum(f.stat().st_size for f in dicom_files(p if p.is_dir() else p.parent))
    if p.suffix.lower() in (".mrxs", ".vms", ".vmu"):
        return None
    return p.stat().st_size


def check_plausible_size(path: str, dimensions: tuple[int, int]) -> None:
    """Refuse a header that claims far more pixels than the file could hold."""
    nbytes = stored_bytes(path)
    w, h = dimensions
    if nbytes is not None and w * h / 1e6 * MIN_BYTES_PER_MEGAPIXEL > nbytes:
        raise SlideError(
            f"{path}: the header claims {w:,} x {h:,} px in a file of {nbytes:,} bytes, "
            "which cannot hold them: the file is truncated or its header is corrupt"
        )
