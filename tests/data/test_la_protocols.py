"""``medssl prepare la2018 --protocol uamt``: UA-MT's published crop and normalisation, world coordinates kept.

The raw LA 2018 layout (``<ID>/lgemri.nrrd`` + ``laendo.nrrd``) is built from the session LA phantom, padded
in-plane so that the published box lies inside the scan, on a rotated, anisotropic, shifted grid.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medssl.cli import main
from medssl.data.datalist import load_datalist
from medssl.data.io import read_image_info
from medssl.data.prepare import prepare_la2018
from medssl.data.prepare.la2018 import PROTOCOL_MARKER
from medssl.data.prepare.la_protocols import (
    UAMT_MARGIN_RANGES,
    check_protocol,
    uamt_crop_box,
    uamt_margins,
    uamt_zscore,
)
from medssl.errors import ConfigError, ErrorList

PAD_XY = 70
_C, _S = np.cos(0.4), np.sin(0.4)
GEOMETRY = {
    "spacing": (0.625, 0.7, 1.25),
    "origin": (-40.5, 22.25, -9.0),
    "direction": (_C, 0.0, -_S, 0.0, 1.0, 0.0, _S, 0.0, _C),
}


def _write(arr_xyz: np.ndarray, path: Path) -> None:
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr_xyz.transpose(2, 1, 0)))
    img.SetSpacing(GEOMETRY["spacing"])
    img.SetOrigin(GEOMETRY["origin"])
    img.SetDirection(GEOMETRY["direction"])
    sitk.WriteImage(img, str(path), useCompression=True)


@pytest.fixture(scope="module")
def la_raw(la_phantom, tmp_path_factory) -> Path:
    """LA 2018 case folders from the phantom's labeled cases (padded in-plane), plus one folder without label."""
    root = tmp_path_factory.mktemp("la_raw")
    dl = load_datalist(la_phantom)
    pad = ((PAD_XY, PAD_XY), (PAD_XY, PAD_XY), (0, 0))
    for item in dl.items("training") + dl.items("validation"):
        cid = Path(item["image"]).name[: -len(".nii.gz")]
        (root / cid).mkdir()
        image = np.asarray(nib.load(item["image"]).dataobj).astype(np.int16)
        label = np.asarray(nib.load(item["label"]).dataobj).astype(np.uint8)
        _write(np.pad(image, pad), root / cid / "lgemri.nrrd")
        _write(np.pad(label * 255, pad), root / cid / "laendo.nrrd")
    (root / "UNLABELED").mkdir()
    _write(np.pad(image, pad), root / "UNLABELED" / "lgemri.nrrd")
    return root


def _ids(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if (p / "laendo.nrrd").is_file())


def _source_xyz(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path))).transpose(2, 1, 0)


def _naive_box(label_xyz: np.ndarray, margins, patch=(112, 112, 80)) -> list[tuple[int, int]]:
    """The published rule written out voxel by voxel: bounding box of label > 0, widened towards the patch by
    half the shortfall, plus the margins, clipped to the scan; x and y only, every slice kept."""
    box = []
    for axis in range(2):
        indices = [i for i in range(label_xyz.shape[axis]) if np.take(label_xyz, i, axis=axis).any()]
        lo, hi = indices[0], indices[-1]
        widen = max(patch[axis] - (hi - lo), 0) // 2
        start = lo - margins[2 * axis] - widen
        stop = hi + margins[2 * axis + 1] + widen
        box.append((start if start > 0 else 0, stop if stop < label_xyz.shape[axis] else label_xyz.shape[axis]))
    box.append((0, label_xyz.shape[2]))
    return box


# ------------------------------------------------------------------------------------------- the crop rule


@pytest.mark.parametrize(
    ("shape", "fg", "patch"),
    [
        ((150, 140, 12), (slice(60, 80), slice(50, 71), slice(3, 9)), (112, 112, 80)),  # inside: widened
        ((150, 140, 12), (slice(0, 5), slice(130, 140), slice(0, 1)), (112, 112, 80)),  # clipped at 0 and at size
        ((60, 50, 6), (slice(7, 8), slice(9, 10), slice(2, 3)), (16, 20, 8)),  # one voxel
        ((60, 50, 6), (slice(5, 55), slice(4, 44), slice(0, 6)), (16, 20, 8)),  # larger than the patch: no widening
    ],
)
def test_crop_box_is_the_published_rule(shape, fg, patch):
    label = np.zeros(shape, dtype=np.uint8)
    label[fg] = 1
    for seed in range(3):
        margins = uamt_margins("CASE", seed)
        assert uamt_crop_box(label, margins, patch) == tuple(_naive_box(label, margins, patch))


def test_crop_box_bad_inputs():
    with pytest.raises(ValueError, match="no foreground"):
        uamt_crop_box(np.zeros((8, 8, 8)), (10,) * 6)
    with pytest.raises(ValueError, match="six margins"):
        uamt_crop_box(np.ones((8, 8, 8)), (10, 10))
    with pytest.raises(ValueError, match="3D"):
        uamt_crop_box(np.ones((8, 8)), (10,) * 6)


def test_margins_cover_the_published_ranges_and_follow_the_seed():
    draws = np.array([uamt_margins(f"CASE{i:03d}", 0) for i in range(300)])
    for axis, (lo, hi) in enumerate(UAMT_MARGIN_RANGES):
        for side in range(2):
            assert set(draws[:, 2 * axis + side].tolist()) == set(range(lo, hi)), (axis, side)
    assert uamt_margins("CASE007", 3) == uamt_margins("CASE007", 3)
    assert any(uamt_margins(f"CASE{i:03d}", 0) != uamt_margins(f"CASE{i:03d}", 1) for i in range(5))


def test_zscore_uses_every_voxel_of_the_scan():
    image = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    out = uamt_zscore(image)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, (image - 11.5) / np.sqrt(np.mean((image - 11.5) ** 2)), rtol=1e-6)
    with pytest.raises(ValueError, match="std 0"):
        uamt_zscore(np.full((3, 3, 3), 7))


# ------------------------------------------------------------------------------------ prepare --protocol uamt


def test_uamt_prepare_crops_normalises_and_keeps_world_coordinates(la_raw, tmp_path, caplog):
    ids = _ids(la_raw)
    out_dir = tmp_path / "la_uamt"
    with caplog.at_level(logging.WARNING):
        out = prepare_la2018(la_raw, out_dir / "datalist.json", validation_ids=ids[-1:], protocol="uamt", crop_seed=5)
    assert "UNLABELED" in caplog.text
    raw = json.loads(out.read_text())
    assert raw["protocol"] == "uamt" and "OPTIMISTIC" in raw["description"]
    assert sorted(raw["crops"]) == ids and "unlabeled" not in raw
    assert (out_dir / PROTOCOL_MARKER).read_text().strip() == "uamt"
    dl = load_datalist(out)
    items = {Path(i["image"]).name[: -len(".nii.gz")]: i for i in dl.items("training") + dl.items("validation")}
    interior = False
    for cid in ids:
        crop = raw["crops"][cid]
        label_src = _source_xyz(la_raw / cid / "laendo.nrrd")
        image_src = _source_xyz(la_raw / cid / "lgemri.nrrd")
        assert crop["margins"] == list(uamt_margins(cid, 5))
        box = _naive_box(label_src, crop["margins"])
        assert [list(b) for b in zip(crop["start"], crop["stop"])] == [list(b) for b in box]
        interior |= any(0 < s and e < n for s, e, n in zip(crop["start"][:2], crop["stop"][:2], label_src.shape))
        (x0, x1), (y0, y1), (z0, z1) = box
        image, label = nib.load(items[cid]["image"]), nib.load(items[cid]["label"])
        assert image.shape == label.shape == (x1 - x0, y1 - y0, z1 - z0)
        assert image.get_data_dtype() == np.float32 and label.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(np.asarray(label.dataobj), (label_src[x0:x1, y0:y1] == 255).astype(np.uint8))
        full = image_src.astype(np.float64)
        expected = ((full - full.mean()) / full.std()).astype(np.float32)[x0:x1, y0:y1]
        np.testing.assert_allclose(np.asarray(image.dataobj), expected, rtol=1e-6, atol=1e-6)
        # a voxel's world position (RAS mm) is the same in the crop and in the source scan
        source_affine = read_image_info(la_raw / cid / "lgemri.nrrd").affine
        for affine in (image.affine, label.affine):
            for ijk in [(0, 0, 0), (x1 - x0 - 1, y1 - y0 - 1, z1 - z0 - 1), (3, 11, 5)]:
                src = (ijk[0] + x0, ijk[1] + y0, ijk[2] + z0)
                np.testing.assert_allclose(affine @ (*ijk, 1), source_affine @ (*src, 1), atol=1e-3)
    assert interior, "no crop lies inside the scan: the test would not see a wrong offset"


def test_default_protocol_is_unchanged(la_raw, tmp_path):
    ids = _ids(la_raw)
    default = prepare_la2018(la_raw, tmp_path / "a" / "datalist.json", validation_ids=ids[-1:])
    full = prepare_la2018(la_raw, tmp_path / "b" / "datalist.json", validation_ids=ids[-1:], protocol="full")
    assert default.read_text() == full.read_text()
    raw = json.loads(default.read_text())
    assert "protocol" not in raw and "crops" not in raw and "unlabeled" in raw
    assert not (tmp_path / "a" / PROTOCOL_MARKER).exists()
    for cid in ids:
        image = nib.load(tmp_path / "a" / "imagesTr" / f"{cid}.nii.gz")
        np.testing.assert_array_equal(np.asarray(image.dataobj), _source_xyz(la_raw / cid / "lgemri.nrrd"))
        assert image.get_data_dtype() == np.int16
        np.testing.assert_allclose(image.affine, read_image_info(la_raw / cid / "lgemri.nrrd").affine, atol=1e-4)


def test_protocols_never_share_a_folder(la_raw, tmp_path):
    val = _ids(la_raw)[-1:]
    prepare_la2018(la_raw, tmp_path / "full" / "datalist.json", validation_ids=val)
    with pytest.raises(ConfigError, match="protocol 'full'"):
        prepare_la2018(la_raw, tmp_path / "full" / "uamt.json", validation_ids=val, protocol="uamt")
    prepare_la2018(la_raw, tmp_path / "uamt" / "datalist.json", validation_ids=val, protocol="uamt")
    with pytest.raises(ConfigError, match="protocol 'uamt'"):
        prepare_la2018(la_raw, tmp_path / "uamt" / "full.json", validation_ids=val)


def test_uamt_empty_label_is_reported_without_output(la_raw, tmp_path):
    root = tmp_path / "raw"
    for cid in _ids(la_raw)[:2]:
        (root / cid).mkdir(parents=True)
        for f in ("lgemri.nrrd", "laendo.nrrd"):
            (root / cid / f).write_bytes((la_raw / cid / f).read_bytes())
    empty = sitk.ReadImage(str(root / cid / "laendo.nrrd")) * 0
    sitk.WriteImage(empty, str(root / cid / "laendo.nrrd"))
    with pytest.raises(ErrorList) as exc:
        prepare_la2018(root, tmp_path / "out" / "datalist.json", protocol="uamt")
    assert f"{cid}/laendo.nrrd: protocol uamt: the label has no foreground voxel" in str(exc.value)
    assert not (tmp_path / "out").exists()


def test_unknown_protocol_is_a_config_error():
    assert check_protocol(None) == check_protocol("") == "full"
    with pytest.raises(ConfigError, match=r"unknown la2018 protocol 'cropped'; choose one of \['full', 'uamt'\]"):
        check_protocol("cropped")


@pytest.mark.parametrize(
    ("dataset", "value", "message"),
    [
        ("la2018", "cropped", "medssl: error: protocol: unknown la2018 protocol 'cropped'; choose one of"),
        ("btcv", "uamt", "medssl: error: protocol: btcv has only the 'full' protocol, got 'uamt'"),
    ],
)
def test_cli_bad_protocol_exits_2_with_one_line(tmp_path, capsys, dataset, value, message):
    code = main(["prepare", dataset, "--root", str(tmp_path), "--out", str(tmp_path / "x.json"), "--protocol", value])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith(message), err
    assert not (tmp_path / "x.json").exists()


def test_cli_help_calls_uamt_optimistic(capsys):
    with pytest.raises(SystemExit):
        main(["prepare", "--help"])
    assert "OPTIMISTIC" in capsys.readouterr().out
