"""Feature stores and ``cscvision features`` / ``cscvision encoders`` end to end, with a
random-initialisation test encoder standing in for a foundation model."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from cscvision.cli import main
from cscvision.core.io import file_sha256
from cscvision.features.store import (
    FeatureStore,
    FeatureStoreError,
    read_feature_store,
    read_store_attrs,
    store_matches,
    write_feature_store,
)
from cscvision.models.encoders import save_random_weights
from cscvision.synth import write_cohort

torch.set_num_threads(1)


def test_store_round_trip_dtypes_and_attributes(tmp_path):
    xy = np.array([[0, 0], [224, 0], [448, 896]], np.int64)
    feats = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    grid = {"mpp": 0.5, "tile_px": 224, "level": 0}
    store = FeatureStore(xy, feats, encoder="uni", weights_sha256="ab" * 32, grid=grid)
    path = write_feature_store(tmp_path / "s.h5", store)
    assert [p.name for p in tmp_path.iterdir()] == ["s.h5"]  # no temporary file left
    back = read_feature_store(path)
    assert back.xy_l0.dtype == np.int32 and back.features.dtype == np.float16
    assert np.array_equal(back.xy_l0, xy) and np.allclose(back.features, feats, atol=1e-3)
    assert (back.encoder, back.weights_sha256, back.grid) == ("uni", "ab" * 32, grid)
    assert back.dim == 4 and len(back) == 3 and back.cscvision_version
    assert read_store_attrs(path)["n_tiles"] == 3
    assert back.rows_of(np.array([[448, 896], [1, 1], [0, 0]])).tolist() == [2, -1, 0]
    assert store_matches(path, encoder="uni", weights_sha256="ab" * 32, grid={"tile_px": 224})
    assert not store_matches(path, encoder="uni", weights_sha256="cd" * 32)
    assert not store_matches(path, encoder="uni", weights_sha256="ab" * 32, grid={"mpp": 1.0})


def test_unreadable_or_malformed_stores_fail_clearly(tmp_path):
    (tmp_path / "bad.h5").write_bytes(b"not hdf5")
    with pytest.raises(FeatureStoreError, match=r"bad\.h5: not a readable"):
        read_feature_store(tmp_path / "bad.h5")
    assert not store_matches(tmp_path / "bad.h5", encoder="uni", weights_sha256="x")
    with pytest.raises(FeatureStoreError, match="xy_l0"):
        bad = FeatureStore(np.zeros((2, 3)), np.zeros((2, 4)), "a", "b")
        write_feature_store(tmp_path / "s.h5", bad)


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("feat")
    cohort = write_cohort(root / "cohort", n_slides=2, n_patients=2, size_px=1536, seed=3)
    save_random_weights("test-vit-tiny", root / "tiny.safetensors")
    save_random_weights("resnet18", root / "resnet18.safetensors")
    return cohort


def _features(cohort: Path, out: Path, *extra: str) -> int:
    weights = cohort.parent.parent / "tiny.safetensors"
    args = ["features", str(cohort), "--encoder", "test-vit-tiny", "--weights", str(weights)]
    return main([*args, "--out", str(out), "--threads", "1", "--workers", "1", *extra])


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_features_cli_writes_stores_and_resumes(slides, tmp_path, capsys):
    out = tmp_path / "features"
    assert _features(slides, out) == 0
    rows = _rows(out / "results.csv")
    assert [r["status"] for r in rows] == ["done", "done"]
    store = read_feature_store(out / f"{rows[0]['slide_id']}.h5")
    weights = slides.parent.parent / "tiny.safetensors"
    assert store.encoder == "test-vit-tiny" and store.weights_sha256 == file_sha256(weights)
    assert store.grid["tile_px"] == 224 and store.grid["mpp"] == 0.5
    assert store.features.shape == (int(rows[0]["n_tiles"]), 192) and len(store) > 0
    assert np.isfinite(store.features.astype(np.float32)).all()
    assert "features: 2 done" in capsys.readouterr().out
    before = (out / f"{rows[0]['slide_id']}.h5").read_bytes()
    assert _features(slides, out) == 0  # complete stores are skipped
    assert [r["status"] for r in _rows(out / "results.csv")] == ["skipped", "skipped"]
    assert _features(slides, out, "--overwrite", "--shard", "0/2") == 0
    assert (out / f"{rows[0]['slide_id']}.h5").read_bytes() == before  # deterministic
    assert len(_rows(out / "results_shard0of2.csv")) == 1


def test_features_cli_refuses_wrong_weights_and_missing_files(slides, tmp_path, capsys):
    wrong = slides.parent.parent / "resnet18.safetensors"
    args = ["features", str(slides), "--encoder", "test-vit-tiny", "--out", str(tmp_path)]
    assert main([*args, "--weights", str(wrong)]) == 2
    err = capsys.readouterr().err
    assert "test-vit-tiny" in err and str(wrong) in err and "first mismatched key" in err
    assert main([*args, "--weights-dir", str(tmp_path)]) == 2
    assert "no weights file in" in capsys.readouterr().err
    assert main([*args[:3], "nope", *args[4:], "--weights", str(wrong)]) == 2
    assert "unknown encoder 'nope'" in capsys.readouterr().err


def test_encoders_lists_the_registry_and_configured_files(tmp_path, capsys):
    (tmp_path / "uni").mkdir()
    (tmp_path / "uni" / "pytorch_model.bin").write_bytes(b"")
    assert main(["encoders", "--weights-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name in ("uni", "uni2-h", "virchow2", "h-optimus-0", "prov-gigapath", "phikon-v2"):
        assert f"\n{name} " in out
    assert f"found {tmp_path / 'uni' / 'pytorch_model.bin'}" in out
    assert "conch: not registered" in out


@pytest.mark.parametrize("module", ["timm", "h5py"])
def test_a_missing_features_extra_says_how_to_install_it(
    module, slides, tmp_path, monkeypatch, capsys
):
    import sys

    monkeypatch.setitem(sys.modules, module, None)  # as if not installed: import fails
    assert _features(slides, tmp_path / "out") == 2
    assert 'pip install "cscvision[features]"' in capsys.readouterr().err


def test_decode_device_choices():
    from cscvision.slides.tilebatches import decode_device

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert decode_device("cpu", cuda, in_process=True) is None
    assert decode_device("auto", cpu, in_process=True) is None  # auto: CUDA only
    assert decode_device("auto", cuda, in_process=True) == cuda
    assert decode_device("gpu", cpu, in_process=True) == cpu  # torch's CPU decoder (tests)
    assert decode_device("gpu", cuda, in_process=False) is None  # no CUDA in DataLoader workers
    with pytest.raises(ValueError, match="choose one of"):
        decode_device("nvjpeg", cuda, in_process=True)


def test_device_decoded_tiles_give_the_cpu_features(slides):
    # The device decode path on CPU tensors feeds the encoder the same tiles as the CPU
    # fast path, so the features are equal bit for bit; and the device path did serve it.
    from cscvision.features.extract import FeatureExtractor, encoder_grid_spec, extract_batches
    from cscvision.models.encoders import load_encoder
    from cscvision.slides.grid import make_grid
    from cscvision.slides.slide import open_slide
    from cscvision.slides.tilebatches import TileBatches, decode_device

    weights = slides.parent.parent / "tiny.safetensors"
    extractor = FeatureExtractor(load_encoder("test-vit-tiny", weights), weights_sha256="x")
    slide_path = sorted(slides.parent.glob("*.tiff"))[0]
    with open_slide(slide_path) as slide:
        grid = make_grid(slide, encoder_grid_spec(extractor.spec))
    on_cpu, on_device = TileBatches(grid, 16), TileBatches(grid, 16)
    on_device.decode_device = decode_device("gpu", extractor.device, in_process=True)
    want = extract_batches(on_cpu, extractor, progress=False)
    got = extract_batches(on_device, extractor, progress=False)
    assert on_device.decode_device == torch.device("cpu")  # not handed back to the CPU path
    assert len(grid) > 16
    np.testing.assert_array_equal(got, want)


def test_features_decode_gpu_without_cuda_names_the_flag(slides, tmp_path, capsys):
    assert _features(slides, tmp_path / "f", "--device", "cpu", "--decode", "gpu") == 2
    err = capsys.readouterr().err
    assert "--decode gpu needs a CUDA device" in err and "--decode cpu or auto" in err
    assert not (tmp_path / "f" / "results.csv").exists()
