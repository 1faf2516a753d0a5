"""The bad-input corpus: every kind of broken dataset ``medssl check`` / ``medssl infer`` must reject clearly.

Each kind is generated into its own fresh ``tmp_path`` dataset at test time (nothing binary is committed): a
small valid dataset (one 8×8×6 image, its 3-class label, a datalist) with exactly one defect. A kind is a
``make(ds) -> (file, problem)`` function that writes the defect and returns the file the one-line error must name
and a regex its problem text must match. Kinds that are not handled yet carry a strict ``xfail`` mark with the
reason, so a fix turns them into a failure that asks for the mark to be removed.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

SHAPE = (8, 8, 6)
AFFINE = np.diag([1.5, 1.5, 2.0, 1.0])
LABELS = {"0": "background", "1": "organ", "2": "tumour"}


@dataclass
class BadDataset:
    """A small valid dataset to damage: ``root/datalist.json``, ``root/imagesTr/case.nii.gz``, ``labelsTr/...``."""

    root: Path

    @property
    def datalist(self) -> Path:
        return self.root / "datalist.json"

    @property
    def image(self) -> Path:
        return self.root / "imagesTr" / "case.nii.gz"

    @property
    def label(self) -> Path:
        return self.root / "labelsTr" / "case.nii.gz"

    def write_datalist(self, training=None, raw: str | None = None, **extra) -> Path:
        if raw is not None:
            self.datalist.write_text(raw)
            return self.datalist
        if training is None:
            training = [{"image": "imagesTr/case.nii.gz", "label": "labelsTr/case.nii.gz"}]
        self.datalist.write_text(json.dumps({"labels": LABELS, "training": training, **extra}, indent=1))
        return self.datalist


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def make_valid_dataset(root: Path) -> BadDataset:
    rng = np.random.default_rng(0)
    ds = BadDataset(root)
    save_nifti(ds.image, rng.normal(size=SHAPE).astype(np.float32))
    label = np.zeros(SHAPE, np.uint8)
    label[2:5, 2:5, 1:4] = 1
    label[5:7, 5:7, 2:4] = 2
    save_nifti(ds.label, label)
    ds.write_datalist()
    return ds


def _label(ds: BadDataset) -> np.ndarray:
    return np.asanyarray(nib.load(str(ds.label)).dataobj)


def _gz_bytes(path: Path) -> bytes:
    return path.read_bytes()


# ------------------------------------------------------------------------------------------------- kinds


def truncated_gzip(ds):
    data = _gz_bytes(ds.image)
    ds.image.write_bytes(data[: len(data) // 2])
    return ds.image, r"corrupt or truncated"


def not_gzip_with_gz_suffix(ds):
    raw = gzip.decompress(_gz_bytes(ds.image))
    ds.image.write_bytes(raw)  # a plain .nii under a .nii.gz name
    return ds.image, r"not gzip-compressed"


def wrong_magic(ds):
    raw = bytearray(gzip.decompress(_gz_bytes(ds.image)))
    raw[344:348] = b"xyz\0"  # NIfTI-1 magic "n+1\0"
    ds.image.write_bytes(gzip.compress(bytes(raw)))
    return ds.image, r"cannot read image"


def zero_bytes(ds):
    ds.image.write_bytes(b"")
    return ds.image, r"empty \(0 bytes\)"


def image_2d(ds):
    save_nifti(ds.image, np.zeros(SHAPE[:2], np.float32))
    return ds.image, r"is 2D"


def image_4d(ds):
    save_nifti(ds.image, np.zeros((*SHAPE, 3), np.float32))
    return ds.image, r"is 4D"


def shape_mismatch(ds):
    save_nifti(ds.label, np.zeros((8, 8, 5), np.uint8))
    return ds.label, r"shape \(8, 8, 5\) differs"


def affine_mismatch(ds):
    shifted = AFFINE.copy()
    shifted[0, 3] = 3.0
    save_nifti(ds.label, _label(ds), shifted)
    return ds.label, r"affine differs"


def nan_voxels(ds):
    data = np.zeros(SHAPE, np.float32)
    data[1, 1, 1] = np.nan
    save_nifti(ds.image, data)
    return ds.image, r"NaN or infinite"


def inf_voxels(ds):
    data = np.zeros(SHAPE, np.float32)
    data[0, 0, 0] = np.inf
    data[1, 0, 0] = -np.inf
    save_nifti(ds.image, data)
    return ds.image, r"NaN or infinite"


def float_labels(ds):
    save_nifti(ds.label, _label(ds).astype(np.float32) * 0.5)
    return ds.label, r"must be integers.*0\.5"


def negative_labels(ds):
    label = _label(ds).astype(np.int16)
    label[0, 0, 0] = -1
    save_nifti(ds.label, label)
    return ds.label, r"negative label values \[-1\]"


def labels_above_declared(ds):
    label = _label(ds)
    label[0, 0, 0] = 7
    save_nifti(ds.label, label)
    return ds.label, r"label values \[7\] are not declared"


def empty_label(ds):
    """A training label map with no foreground: nothing to learn from (the datalist promises labeled cases)."""
    save_nifti(ds.label, np.zeros(SHAPE, np.uint8))
    return ds.label, r"(empty|no foreground)"


def training_item_without_label(ds):
    ds.write_datalist(training=[{"image": "imagesTr/case.nii.gz"}])
    return ds.datalist, r"training\[0\].*label"


def missing_file(ds):
    ds.image.unlink()
    return ds.image, r"file not found"


def unreadable_permissions(ds):
    os.chmod(ds.image, 0)
    return ds.image, r"(permission|not readable)"


def datalist_not_json(ds):
    ds.write_datalist(raw='{"training": [ {"image": "imagesTr/case.nii.gz",, } ')
    return ds.datalist, r"not valid JSON"


def datalist_missing_keys(ds):
    ds.write_datalist(raw=json.dumps({"labels": LABELS, "name": "x"}))
    return ds.datalist, r"none of the keys"


def datalist_item_missing_image(ds):
    ds.write_datalist(training=[{"label": "labelsTr/case.nii.gz"}])
    return ds.datalist, r"training\[0\] has no 'image' path"


def absolute_path_outside_dataset(ds):
    outside = save_nifti(ds.root.parent / f"{ds.root.name}_outside" / "other.nii.gz", np.zeros(SHAPE, np.float32))
    ds.write_datalist(training=[{"image": str(outside), "label": "labelsTr/case.nii.gz"}])
    return ds.datalist, r"outside"


def dotdot_path_outside_dataset(ds):
    outside = save_nifti(ds.root.parent / f"{ds.root.name}_outside" / "other.nii.gz", np.zeros(SHAPE, np.float32))
    rel = os.path.relpath(outside, ds.root)
    ds.write_datalist(training=[{"image": rel, "label": "labelsTr/case.nii.gz"}])
    return ds.datalist, r"outside"


def _patch_header(path: Path, **fields) -> Path:
    """Rewrite NIfTI-1 header fields in place, bypassing nibabel's own consistency checks on save."""
    raw = gzip.decompress(path.read_bytes())
    hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(raw))
    for name, value in fields.items():
        hdr[name] = value
    path.write_bytes(gzip.compress(hdr.binaryblock + raw[348:]))
    return path


def zero_spacing_sform(ds):
    _patch_header(ds.image, srow_y=[0.0, 0.0, 0.0, 0.0], pixdim=[1.0, 1.5, 0.0, 2.0, 1, 1, 1, 1])
    return ds.image, r"spacing must be finite and > 0, got \(1\.5, 0\.0, 2\.0\)"


def zero_pixdim_qform(ds):
    """qform-only header with pixdim y = 0: nibabel silently reads it as 1 mm, a wrong grid."""
    _patch_header(ds.image, sform_code=0, qform_code=1, pixdim=[1.0, 1.5, 0.0, 2.0, 1, 1, 1, 1])
    return ds.image, r"spacing"


def negative_pixdim_qform(ds):
    """qform-only header with a negative pixdim: the NIfTI standard requires pixdim[1..3] > 0."""
    _patch_header(ds.image, sform_code=0, qform_code=1, pixdim=[1.0, -1.5, 1.5, 2.0, 1, 1, 1, 1])
    return ds.image, r"spacing"


def huge_dims_tiny_file(ds):
    raw = bytearray(gzip.decompress(_gz_bytes(ds.image)))
    dims = np.frombuffer(bytes(raw[40:56]), np.int16).copy()
    dims[1:4] = 30000  # 2.7e13 voxels declared, 8*8*6 stored
    raw[40:56] = dims.tobytes()
    ds.image.write_bytes(gzip.compress(bytes(raw)))
    return ds.image, r"(truncated|cannot read|shape)"


def nrrd_unsupported_encoding(ds):
    path = ds.root / "imagesTr" / "case.nrrd"
    header = (
        "NRRD0004\ntype: float\ndimension: 3\nsizes: 8 8 6\nspace: left-posterior-superior\n"
        "space directions: (1.5,0,0) (0,1.5,0) (0,0,2)\nspace origin: (0,0,0)\nencoding: zstd\n\n"
    )
    path.write_bytes(header.encode() + b"\x00" * 64)
    ds.write_datalist(training=[{"image": "imagesTr/case.nrrd", "label": "labelsTr/case.nii.gz"}])
    return path, r"cannot read image"


def unsupported_suffix(ds):
    path = ds.root / "imagesTr" / "case.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n")
    ds.write_datalist(training=[{"image": "imagesTr/case.png", "label": "labelsTr/case.nii.gz"}])
    return path, r"unsupported file type"


def _xfail(kind, reason: str):
    return pytest.param(kind, marks=pytest.mark.xfail(strict=True, reason=f"not handled yet: {reason}"))


_ROOT = os.name != "nt" and os.geteuid() == 0

KINDS = [
    truncated_gzip,
    not_gzip_with_gz_suffix,
    wrong_magic,
    zero_bytes,
    image_2d,
    image_4d,
    shape_mismatch,
    affine_mismatch,
    nan_voxels,
    inf_voxels,
    float_labels,
    negative_labels,
    labels_above_declared,
    empty_label,
    training_item_without_label,
    missing_file,
    pytest.param(
        unreadable_permissions,
        marks=pytest.mark.skipif(_ROOT, reason="running as root: chmod 000 does not stop root from reading"),
    ),
    datalist_not_json,
    datalist_missing_keys,
    datalist_item_missing_image,
    absolute_path_outside_dataset,
    dotdot_path_outside_dataset,
    zero_spacing_sform,
    zero_pixdim_qform,
    negative_pixdim_qform,
    huge_dims_tiny_file,
    nrrd_unsupported_encoding,
    unsupported_suffix,
]


# kinds whose defect is in the image file itself: these also go through ``medssl infer`` (no datalist, no label)
IMAGE_KINDS = {
    "truncated_gzip": None,
    "not_gzip_with_gz_suffix": None,
    "wrong_magic": None,
    "zero_bytes": None,
    "image_2d": None,
    "image_4d": None,
    "nan_voxels": None,
    "inf_voxels": None,
    "missing_file": None,
    "unreadable_permissions": None,
    "zero_spacing_sform": None,
    "zero_pixdim_qform": None,
    "negative_pixdim_qform": None,
    "huge_dims_tiny_file": None,
    "nrrd_unsupported_encoding": None,
    "unsupported_suffix": None,
}


def _function(kind):
    return kind.values[0] if hasattr(kind, "values") else kind


def pytest_generate_tests(metafunc):
    if "bad_kind" in metafunc.fixturenames:
        metafunc.parametrize("bad_kind", KINDS, ids=[_function(k).__name__ for k in KINDS])
    if "bad_image_kind" in metafunc.fixturenames:
        params = []
        for kind in KINDS:
            fn = _function(kind)
            if fn.__name__ not in IMAGE_KINDS:
                continue
            marks = [m for m in getattr(kind, "marks", ()) if m.name == "skipif"]
            reason = IMAGE_KINDS[fn.__name__]
            if reason:
                marks.append(pytest.mark.xfail(strict=True, reason=f"not handled yet by infer: {reason}"))
            params.append(pytest.param(fn, marks=marks, id=fn.__name__))
        metafunc.parametrize("bad_image_kind", params)


@pytest.fixture
def valid_dataset(tmp_path) -> BadDataset:
    """The undamaged base dataset of the corpus."""
    return make_valid_dataset(tmp_path / "dataset")


def _damaged(root: Path, kind):
    ds = make_valid_dataset(root)
    file, problem = kind(ds)
    yield ds, Path(file), problem
    for p in ds.root.rglob("*"):  # let pytest clean up chmod-000 files
        if p.is_file():
            os.chmod(p, 0o644)


@pytest.fixture
def bad_dataset(tmp_path, bad_kind):
    """``(dataset, file, problem_regex)``: a fresh dataset under ``tmp_path/dataset`` with one defect."""
    yield from _damaged(tmp_path / "dataset", bad_kind)


@pytest.fixture
def bad_image(tmp_path, bad_image_kind):
    """Like ``bad_dataset``, for the kinds whose defect is in the image (``file`` is the image to segment)."""
    yield from _damaged(tmp_path / "dataset", bad_image_kind)
