"""Compare two golden sets written by `scripts/golden_models.py`.

    python scripts/golden_compare.py BEFORE AFTER [--tol 1e-6]

Every file is compared by what it holds: JSON and CSV value by value (numbers within
--tol, timing fields and machine-dependent fields ignored, each set's own root folder
replaced by ROOT), safetensors tensor by tensor bit for bit, other files by sha256 of their
bytes with the root folder replaced (text) or as they are (binary). Files only one side has
are listed. TensorBoard event files, Lightning checkpoints and hparams files hold wall
times and pickled state and are skipped (the exported safetensors carry the weights).
Prints one line per difference and exits 1 if there is any.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import re
import sys
from pathlib import Path

SKIP_PARTS = ("events.out.tfevents", ".ckpt", "hparams.yaml", ".lock", "__pycache__")
TIMING_KEYS = {
    "seconds", "elapsed", "elapsed_s", "time", "time_s", "duration", "duration_s", "wall_s",
    "started", "finished", "created", "date", "timestamp", "tiles_per_s", "slides_per_s",
    "written_at", "generated", "mtime", "slide_mtime", "train_seconds", "python", "platform",
    "hostname", "host", "wall_seconds", "extract_seconds",
}  # fmt: skip
TEXT_SUFFIXES = {".json", ".csv", ".md", ".yaml", ".yml", ".txt", ".html", ".geojson", ".svg",
                 ".css", ".js", ".xml", ".log"}  # fmt: skip


def is_timing(key: str) -> bool:
    k = key.lower()
    return k in TIMING_KEYS or k.endswith(("_seconds", "_sec", "_time", "_per_s")) or "time" in k


def same_value(a: object, b: object, tol: float, path: str, out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if is_timing(str(k)):
                continue
            if k not in a or k not in b:
                out.append(f"{path}.{k}: only in {'after' if k not in a else 'before'}")
                continue
            same_value(a[k], b[k], tol, f"{path}.{k}", out)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{path}: length {len(a)} != {len(b)}")
            return
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            same_value(x, y, tol, f"{path}[{i}]", out)
    elif isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        if not (a == b or (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol):
            out.append(f"{path}: {a!r} != {b!r}")
    elif a != b:
        out.append(f"{path}: {str(a)[:120]!r} != {str(b)[:120]!r}")


def number(s: str) -> float | str:
    try:
        return float(s)
    except ValueError:
        return s


def compare_csv(a: str, b: str, tol: float, out: list[str]) -> None:
    ra, rb = list(csv.reader(io.StringIO(a))), list(csv.reader(io.StringIO(b)))
    if not ra or not rb:
        if ra != rb:
            out.append("one side empty")
        return
    head = ra[0]
    if head != rb[0]:
        out.append(f"header {head} != {rb[0]}")
        return
    if len(ra) != len(rb):
        out.append(f"{len(ra) - 1} rows != {len(rb) - 1}")
        return
    keep = [i for i, h in enumerate(head) if not is_timing(h)]
    for n, (x, y) in enumerate(zip(ra[1:], rb[1:], strict=True), 1):
        row = [number(x[i]) for i in keep if i < len(x)]
        other = [number(y[i]) for i in keep if i < len(y)]
        errs: list[str] = []
        same_value(row, other, tol, f"row {n}", errs)
        out.extend(errs[:3])
        if len(out) > 20:
            out.append("...")
            return


def compare_safetensors(pa: Path, pb: Path, out: list[str]) -> None:
    from safetensors.numpy import load_file

    ta, tb = load_file(str(pa)), load_file(str(pb))
    if sorted(ta) != sorted(tb):
        out.append(f"tensor names differ: {sorted(set(ta) ^ set(tb))[:5]}")
        return
    for k in sorted(ta):
        if ta[k].dtype != tb[k].dtype or ta[k].shape != tb[k].shape:
            out.append(f"{k}: {ta[k].dtype}{ta[k].shape} != {tb[k].dtype}{tb[k].shape}")
        elif ta[k].tobytes() != tb[k].tobytes():
            diff = abs(ta[k].astype("float64") - tb[k].astype("float64")).max()
            out.append(f"{k}: not bit-identical (max |diff| {diff:.3g})")


def compare_h5(pa: Path, pb: Path, out: list[str], roots: tuple[Path, Path]) -> None:
    """Every dataset (values) and attribute of two HDF5 files, groups included."""
    import h5py
    import numpy as np

    def walk(f: h5py.File, root: Path) -> dict[str, tuple[str, object]]:
        def plain(attrs: object) -> dict[str, str]:
            return {
                k: str(v).replace(str(root), "ROOT") for k, v in attrs.items() if not is_timing(k)
            }

        items = {"/": ("attrs", plain(f.attrs))}

        def visit(name: str, obj: object) -> None:
            attrs = plain(obj.attrs)
            items[f"{name}@"] = ("attrs", attrs)
            if isinstance(obj, h5py.Dataset):
                items[name] = ("data", obj[()])

        f.visititems(visit)
        return items

    with h5py.File(pa, "r") as fa, h5py.File(pb, "r") as fb:
        ia, ib = walk(fa, roots[0]), walk(fb, roots[1])
    if sorted(ia) != sorted(ib):
        out.append(f"objects differ: {sorted(set(ia) ^ set(ib))[:5]}")
        return
    for k in sorted(ia):
        (kind, va), (_, vb) = ia[k], ib[k]
        same = va == vb if kind == "attrs" else np.array_equal(va, vb)
        if not same:
            out.append(f"{k}: {kind} differ")


SVG_VOLATILE = re.compile(r"<dc:date>[^<]*</dc:date>|(?<=[\"#])[mp][0-9a-f]{10}\b")


def text(path: Path, root: Path) -> str:
    """A text file with its set's root replaced; what varies from run to run in one code
    version is masked: matplotlib's SVG date and random marker ids, the report's seconds and
    weights digest."""
    body = path.read_text(errors="replace").replace(str(root), "ROOT")
    if path.suffix == ".svg":
        body = SVG_VOLATILE.sub("VOLATILE", body)
    if path.suffix == ".html":  # seconds; the weights digest (see path_derived)
        body = mask_seconds_column(body)
        body = re.sub(r"(weights_sha256</th><td>)[0-9a-f]+", r"\1DIGEST", body)
    return body


def mask_seconds_column(html: str) -> str:
    """The report's cohort table with its ``seconds`` column (a timing) masked."""
    head = re.search(r"<th data-col='(\d+)'>seconds</th>", html)
    if not head:
        return html
    col = int(head.group(1))

    def row(m: re.Match) -> str:
        cells = m.group(0).split("<td>")
        if len(cells) > col + 1:
            cells[col + 1] = re.sub(r"^[^<]*", "SECONDS", cells[col + 1])
        return "<td>".join(cells)

    return re.sub(r"<tr><td>.*?</tr>", row, html)


def path_derived(rel: Path, path: str) -> bool:
    """Values that are digests of absolute paths or of file bytes that vary in one code
    version: a tile-cache key (a digest of a record holding the slide's path) and a
    summary's weights digest (safetensors writes its metadata in hash-map order; the
    weights themselves are compared tensor by tensor)."""
    if "/cache/" in f"/{rel}" and rel.name == "key.json" and path == "$.key":
        return True
    return rel.name == "summary.json" and path == "$.model.weights_sha256"


def compare_file(rel: Path, a: Path, b: Path, tol: float, rel_b: Path | None = None) -> list[str]:
    pa, pb = a / rel, b / (rel_b or rel)
    out: list[str] = []
    suffix = pa.suffix.lower()
    if suffix == ".safetensors":
        compare_safetensors(pa, pb, out)
    elif suffix == ".h5":
        compare_h5(pa, pb, out, (a, b))
    elif suffix in (".json", ".geojson"):
        try:
            same_value(json.loads(text(pa, a)), json.loads(text(pb, b)), tol, "$", out)
            out[:] = [d for d in out if not path_derived(rel, d.split(":")[0])]
        except json.JSONDecodeError:
            if text(pa, a) != text(pb, b):
                out.append("text differs")
    elif suffix == ".csv":
        compare_csv(text(pa, a), text(pb, b), tol, out)
    elif suffix in TEXT_SUFFIXES:
        if text(pa, a) != text(pb, b):
            out.append("text differs")
    elif hashlib.sha256(pa.read_bytes()).digest() != hashlib.sha256(pb.read_bytes()).digest():
        out.append("bytes differ")
    return out


# the tile cache names each slide's folder by a digest of its absolute path
CACHE_DIGEST = re.compile(r"(/cache/[^/]+)-[0-9a-f]{12}(?=/)")


def files(root: Path) -> dict[str, Path]:
    """Each file under ``root`` by its relative path, path digests replaced."""
    return {
        CACHE_DIGEST.sub(r"\1-DIGEST", "/" + str(p.relative_to(root)))[1:]: p.relative_to(root)
        for p in root.rglob("*")
        if p.is_file() and not any(s in str(p) for s in SKIP_PARTS)
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--tol", type=float, default=1e-6, help="for numbers in JSON and CSV")
    args = parser.parse_args()
    a, b = args.before.resolve(), args.after.resolve()
    fa, fb = files(a), files(b)
    problems = [f"only in before: {p}" for p in sorted(fa.keys() - fb.keys())]
    problems += [f"only in after: {p}" for p in sorted(fb.keys() - fa.keys())]
    same = 0
    for rel in sorted(fa.keys() & fb.keys()):
        diffs = compare_file(fa[rel], a, b, args.tol, fb[rel])
        if diffs:
            problems += [f"{rel}: {d}" for d in diffs]
        else:
            same += 1
    print("\n".join(problems))
    shared, only_a, only_b = fa.keys() & fb.keys(), fa.keys() - fb.keys(), fb.keys() - fa.keys()
    print(f"{same} of {len(shared)} shared files the same; {len(only_a)} only before, "
          f"{len(only_b)} only after; {len(problems)} difference lines")  # fmt: skip
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
