"""medssl.inference.Predictor: geometry round trips, precision, reference agreement, folders, safety."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from medssl.checkpoint import build_network, save_checkpoint
from medssl.errors import CheckpointError, DataError, ErrorList
from medssl.inference import Predictor, infer
from medssl.inference.predictor import largest_components
from medssl.inference.reference import monai_reference_labels
from medssl.inference.volume import read_volume
from medssl.transforms.presets import preprocessing_summary

MODEL_SPACING = (1.5, 1.5, 2.0)


# ------------------------------------------------------------------------------------------------ helpers


def _threshold_checkpoint(path: Path, roi=(16, 16, 16)) -> Path:
    """A 1×1×1 convolution labelling voxels above 500 HU: the expected output is known on any grid."""
    config = {"_target_": "monai.networks.blocks.Convolution", "spatial_dims": 3, "in_channels": 1,
              "out_channels": 2, "kernel_size": 1, "conv_only": True}  # fmt: skip
    state = {"conv.weight": torch.tensor([-1.0, 1.0]).reshape(2, 1, 1, 1, 1), "conv.bias": torch.tensor([0.5, -0.5])}
    pre = preprocessing_summary(spacing=MODEL_SPACING, a_min=0, a_max=1000, roi_size=roi)  # 500 HU -> 0.5
    save_checkpoint(path, network=config, state_dict=state, stage="test", preprocessing=pre, labels={0: "bg", 1: "hi"})
    return path


def _rotation(ax: float, az: float) -> np.ndarray:
    cx, sx, cz, sz = math.cos(ax), math.sin(ax), math.cos(az), math.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ rx


def _affine(direction, spacing, shape) -> np.ndarray:
    """RAS affine with the volume's centre at a non-trivial world point."""
    a = np.eye(4)
    a[:3, :3] = np.asarray(direction, dtype=float) @ np.diag(spacing)
    a[:3, 3] = np.array([12.3, -40.7, 101.1]) - a[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    return a


def _blob(shape, affine) -> np.ndarray:
    """An off-centre ellipsoid (1000 HU in 0 HU) defined in world millimetres, so every grid sees the same body."""
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3)
    world = idx @ affine[:3, :3].T + affine[:3, 3]
    centre = affine[:3, :3] @ ((np.asarray(shape) - 1) / 2) + affine[:3, 3] + np.array([2.0, -3.0, 1.5])
    extent = np.abs(affine[:3, :3]) @ np.asarray(shape)
    r = 0.3 * extent
    inside = (((world - centre) / r) ** 2).sum(1) <= 1
    return np.where(inside, 1000, 0).astype(np.int16).reshape(shape)


def _write_nifti(path: Path, data, affine, qform_code=1, sform_code=1) -> Path:
    img = nib.Nifti1Image(data, affine)
    img.header.set_qform(affine, code=qform_code)
    img.header.set_sform(affine, code=sform_code)
    nib.save(img, path)
    return path


def _write_itk(path: Path, data, affine) -> Path:
    img = sitk.GetImageFromArray(np.ascontiguousarray(data.T))  # ITK arrays are (z, y, x)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    lps = np.diag([-1.0, -1.0, 1.0])
    img.SetSpacing(spacing.tolist())
    img.SetDirection((lps @ affine[:3, :3] @ np.diag(1 / spacing)).ravel().tolist())
    img.SetOrigin((lps @ affine[:3, 3]).tolist())
    sitk.WriteImage(img, str(path))
    return path


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


# Each case: (file suffix, direction, spacing, shape, qform/sform codes, exact). "exact" grids differ from the
# model grid by axis flips / permutations only, so the labels must equal the threshold voxel for voxel.
PERMUTED = np.array([[0, 1, 0], [0, 0, 1], [1, 0, 0]], dtype=float)  # x→S, y→R, z→A (PIR-like storage)
GEOMETRIES = {
    "ras": (".nii.gz", np.eye(3), MODEL_SPACING, (30, 28, 20), (1, 1), True),
    "lps": (".nii.gz", np.diag([-1.0, -1.0, 1.0]), MODEL_SPACING, (30, 28, 20), (1, 1), True),
    "permuted": (".nii", PERMUTED, (2.0, 1.5, 1.5), (20, 30, 28), (1, 1), True),
    "qform-only": (".nii.gz", np.diag([-1.0, 1.0, -1.0]), MODEL_SPACING, (24, 26, 18), (1, 0), True),
    "oblique": (".nii.gz", _rotation(0.2, 0.35), MODEL_SPACING, (30, 28, 20), (1, 1), False),
    "anisotropic": (".nii.gz", np.eye(3), (0.7, 0.8, 3.0), (60, 52, 14), (1, 1), False),
    "smaller-than-roi": (".nii.gz", np.diag([-1.0, -1.0, 1.0]), MODEL_SPACING, (9, 12, 6), (1, 1), True),
    "nrrd-lps": (".nrrd", np.diag([-1.0, -1.0, 1.0]), MODEL_SPACING, (30, 28, 20), None, True),
    "mha-oblique-anisotropic": (".mha", _rotation(-0.3, 0.5), (0.9, 1.2, 2.5), (40, 30, 16), None, False),
}


@pytest.fixture(scope="module")
def threshold_model(tmp_path_factory) -> Path:
    return _threshold_checkpoint(tmp_path_factory.mktemp("thr") / "model.pt")


# ------------------------------------------------------------------------------------------------ geometry


@pytest.mark.parametrize("case", sorted(GEOMETRIES))
def test_geometry_round_trip(tmp_path, threshold_model, case):
    suffix, direction, spacing, shape, codes, exact = GEOMETRIES[case]
    affine = _affine(direction, spacing, shape)
    data = _blob(shape, affine)
    src = tmp_path / f"scan{suffix}"
    if codes is None:
        _write_itk(src, data, affine)
    else:
        _write_nifti(src, data, affine, *codes)
    report = Predictor(threshold_model, precision="fp32", progress=False).predict_paths([src], tmp_path / "out")
    out = tmp_path / "out" / "scan_seg.nii.gz"
    assert report.written[str(src)][0] == out and not report.failures

    # nibabel: same shape and affine, integer type; a NIfTI input's qform / sform (and codes) are kept exactly
    got = nib.load(out)
    assert got.shape == shape and got.get_data_dtype() == np.uint8
    assert np.allclose(got.affine, affine, atol=1e-4)
    if codes is not None:
        ref = nib.load(src)
        for form in ("qform", "sform"):
            m_in, c_in = getattr(ref.header, f"get_{form}")(coded=True)
            m_out, c_out = getattr(got.header, f"get_{form}")(coded=True)
            assert c_in == c_out and (m_in is None) == (m_out is None)
            assert m_in is None or np.array_equal(m_in, m_out)
    # SimpleITK: same size, origin, spacing and direction as the input read by SimpleITK
    s_in, s_out = sitk.ReadImage(str(src)), sitk.ReadImage(str(out))
    assert s_out.GetSize() == s_in.GetSize()
    for what in ("GetOrigin", "GetSpacing", "GetDirection"):
        np.testing.assert_allclose(getattr(s_out, what)(), getattr(s_in, what)(), atol=1e-4, err_msg=what)
    # the labels sit on the body in both readers' voxel order
    truth_nib = np.asanyarray(nib.load(src).dataobj) > 500 if codes else data > 500
    labels_nib = np.asanyarray(got.dataobj) == 1
    labels_itk, truth_itk = sitk.GetArrayFromImage(s_out) == 1, sitk.GetArrayFromImage(s_in) > 500
    if exact:
        assert np.array_equal(labels_nib, truth_nib) and np.array_equal(labels_itk, truth_itk)
    else:  # resampled twice (bilinear there, nearest back): only boundary voxels may differ
        assert _dice(labels_nib, truth_nib) > 0.9 and _dice(labels_itk, truth_itk) > 0.9
    sidecar = json.loads((tmp_path / "out" / "scan_seg.json").read_text())
    assert sidecar["labels"] == {"0": "bg", "1": "hi"} and sidecar["source"] == str(src)


def test_probability_map(tmp_path, threshold_model):
    shape = (20, 22, 14)
    affine = _affine(np.diag([-1.0, -1.0, 1.0]), MODEL_SPACING, shape)
    src = _write_nifti(tmp_path / "scan.nii.gz", _blob(shape, affine), affine)
    Predictor(threshold_model, precision="fp32", probabilities=True, progress=False).predict_paths(src, tmp_path)
    prob = nib.load(tmp_path / "scan_prob.nii.gz")
    labels = np.asanyarray(nib.load(tmp_path / "scan_seg.nii.gz").dataobj)
    p = prob.get_fdata()
    assert prob.shape == (*shape, 2) and prob.get_data_dtype() == np.int16
    assert np.allclose(prob.affine, affine, atol=1e-4)
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-3)
    assert np.array_equal(p.argmax(-1), labels)
    # logits ±0.5 at 0 and 1000 HU: the winning class has softmax(0.5 - (-0.5)) = sigmoid(1) = 0.731
    np.testing.assert_allclose(p.max(-1), 1 / (1 + math.exp(-1.0)), atol=1e-3)


# ------------------------------------------------------------------------------------------------ trained model


def _train_tiny(datalist: Path, steps: int = 60) -> dict:
    """A tiny UNETR trained on one phantom case: logits with structure, not random noise."""
    from monai.losses import DiceCELoss
    from monai.transforms import Compose

    from medssl.transforms.presets import preprocessing_from_summary

    torch.manual_seed(0)
    config = {"_target_": "medssl.networks.unetr.UNETR", "in_channels": 1, "out_channels": 14,
              "img_size": [32, 32, 32], "patch_size": 8, "hidden_size": 48, "mlp_dim": 96, "num_layers": 2,
              "num_heads": 4, "feature_size": 8}  # fmt: skip
    pre = preprocessing_summary(spacing=MODEL_SPACING, a_min=-175, a_max=250, roi_size=[32, 32, 32])
    info = json.loads(datalist.read_text())
    case = info["training"][0]
    chain = Compose(preprocessing_from_summary(pre, keys=("image", "label"), crop_foreground=False))
    data = chain({k: str(datalist.parent / case[k]) for k in ("image", "label")})
    x, y = data["image"].as_tensor(), data["label"].as_tensor()
    net = build_network({"network": config}, load_weights=False)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        starts = [[int(rng.integers(0, max(s - 32, 0) + 1)) for s in x.shape[1:]] for _ in range(2)]
        crop = lambda t, a, b, c: t[:, a : a + 32, b : b + 32, c : c + 32]  # noqa: E731
        loss = loss_fn(net(torch.stack([crop(x, *s) for s in starts])), torch.stack([crop(y, *s) for s in starts]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    labels = {str(k): v for k, v in info["labels"].items()}
    return {"network": config, "state_dict": net.state_dict(), "preprocessing": pre, "labels": labels, "case": case}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ct_phantom) -> dict:
    result = _train_tiny(ct_phantom)
    path = tmp_path_factory.mktemp("trained") / "model.pt"
    save_checkpoint(
        path,
        network=result["network"],
        state_dict=result["state_dict"],
        stage="finetune",
        preprocessing=result["preprocessing"],
        labels=result["labels"],
    )
    image = ct_phantom.parent / result["case"]["image"]
    label = ct_phantom.parent / result["case"]["label"]
    return {"model": path, "image": image, "label": label}


def _pooled_dice(a: np.ndarray, b: np.ndarray) -> float:
    fg = (a > 0) | (b > 0)
    return 2.0 * np.sum((a == b) & fg) / (np.sum(a > 0) + np.sum(b > 0))


def test_trained_model_learned_something(trained):
    labels = Predictor(trained["model"], precision="fp32", progress=False).predict_volume(read_volume(trained["image"]))
    ref = np.asanyarray(nib.load(trained["label"]).dataobj)
    assert _pooled_dice(labels.labels, ref) > 0.3  # not noise: the bf16 and reference comparisons below mean something


@pytest.mark.native_bf16
def test_bf16_agrees_with_fp32(trained):
    volume = read_volume(trained["image"])
    fp32 = Predictor(trained["model"], precision="fp32", progress=False).predict_volume(volume).labels
    bf16 = Predictor(trained["model"], precision="bf16", progress=False).predict_volume(volume).labels
    assert _pooled_dice(bf16, fp32) >= 0.99
    assert np.mean(bf16 == fp32) >= 0.995


@pytest.mark.parametrize("interpolation, bound", [("linear", 0.999), ("nearest", 0.9)])
def test_agrees_with_monai_reference_pipeline(trained, interpolation, bound):
    """Memory-bounded path vs the tutorial recipe (full logits, softmax, Invertd on probabilities, argmax)."""
    predictor = Predictor(
        trained["model"], precision="fp32", overlap=0.5, mode="constant", interpolation=interpolation, progress=False
    )
    ours = predictor.predict_volume(read_volume(trained["image"])).labels
    ref = monai_reference_labels(
        trained["image"], predictor.network, predictor.preprocessing, predictor.roi_size, overlap=0.5
    )
    assert ours.shape == ref.shape
    assert _pooled_dice(ours, ref) >= bound


def test_reference_with_inverted_labels_agrees_with_the_nearest_path(trained):
    """The fair baseline of bench/inference.py (argmax, nearest Invertd) against the Predictor's nearest path."""
    predictor = Predictor(
        trained["model"], precision="fp32", overlap=0.5, mode="gaussian", interpolation="nearest", progress=False
    )
    ours = predictor.predict_volume(read_volume(trained["image"])).labels
    ref = monai_reference_labels(
        trained["image"], predictor.network, predictor.preprocessing, predictor.roi_size, overlap=0.5,
        mode="gaussian", invert="labels",
    )  # fmt: skip
    assert ours.shape == ref.shape and ref.dtype == np.uint8
    assert _pooled_dice(ours, ref) >= 0.98
    with pytest.raises(ValueError, match="invert"):
        monai_reference_labels(trained["image"], predictor.network, predictor.preprocessing, predictor.roi_size,
                               invert="probability")  # fmt: skip


def test_evaluate_scores_the_output(tmp_path, trained):
    """``medssl evaluate`` on the written file gives the Dice computed directly on the predicted array."""
    from medssl.metrics import evaluate_folder

    out = tmp_path / "pred"
    infer(trained["model"], [trained["image"]], out, progress=False)  # precision auto
    pred = np.asanyarray(nib.load(next(out.glob("*_seg.nii.gz"))).dataobj)
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    (ref_dir / trained["image"].name).symlink_to(trained["label"])
    evaluate_folder(out, ref_dir, tmp_path / "metrics.csv")
    import csv

    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    ref = np.asanyarray(nib.load(trained["label"]).dataobj)
    for row in rows:
        c = int(row["label"])
        a, b = pred == c, ref == c
        if a.sum() + b.sum():
            assert float(row["dice"]) == pytest.approx(_dice(a, b), abs=1e-4)


# ------------------------------------------------------------------------------------------------ safety


def test_folder_with_bad_files_processes_the_rest(tmp_path, threshold_model):
    inp = tmp_path / "in"
    inp.mkdir()
    shape = (16, 16, 10)
    affine = _affine(np.eye(3), MODEL_SPACING, shape)
    for name in ("a", "c"):
        _write_nifti(inp / f"{name}.nii.gz", _blob(shape, affine), affine)
    (inp / "b_corrupt.nii.gz").write_bytes(b"\x1f\x8b" + b"garbage" * 10)
    nib.save(nib.Nifti1Image(np.zeros((16, 16), np.int16), np.eye(4)), inp / "d_2d.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 3), np.int16), np.eye(4)), inp / "e_4d.nii.gz")
    (inp / "f_empty.nrrd").write_bytes(b"")
    (inp / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    with pytest.raises(ErrorList) as err:
        infer(threshold_model, [inp], out, precision="fp32", progress=False)
    lines = str(err.value).splitlines()
    assert len(lines) == 5  # four failures and the summary
    for name, problem in [("b_corrupt", "corrupt"), ("d_2d", "2D"), ("e_4d", "4D"), ("f_empty", "empty")]:
        assert any(name in line and problem in line for line in lines), (name, lines)
    assert lines[-1] == "2 of 6 volumes segmented; 4 failed"
    assert sorted(p.name for p in out.iterdir()) == ["a_seg.json", "a_seg.nii.gz", "c_seg.json", "c_seg.nii.gz"]
    report = Predictor(threshold_model, precision="fp32", progress=False).predict_paths(inp, out, raise_on_error=False)
    assert len(report.written) == 2 and len(report.failures) == 4


def test_refuses_to_overwrite_an_input(tmp_path, threshold_model):
    shape = (16, 16, 10)
    affine = _affine(np.eye(3), MODEL_SPACING, shape)
    a = _write_nifti(tmp_path / "a.nii.gz", _blob(shape, affine), affine)
    a_seg = _write_nifti(tmp_path / "a_seg.nii.gz", np.zeros(shape, np.int16), affine)  # an input named like an output
    before = a_seg.read_bytes()
    with pytest.raises(ErrorList, match="refusing to overwrite an input"):
        infer(threshold_model, [a, a_seg], tmp_path, precision="fp32", progress=False)
    assert a_seg.read_bytes() == before
    assert (tmp_path / "a_seg_seg.nii.gz").is_file()  # the other input was still processed
    assert not list(tmp_path.glob(".*.tmp"))


def test_memory_estimate_refuses_a_volume_that_cannot_fit(tmp_path, threshold_model):
    shape = (16, 16, 10)
    affine = _affine(np.eye(3), MODEL_SPACING, shape)
    src = _write_nifti(tmp_path / "a.nii.gz", _blob(shape, affine), affine)
    predictor = Predictor(threshold_model, precision="fp32", progress=False, memory_limit=10_000)
    with pytest.raises(DataError, match=r"a.nii.gz: needs an estimated .* GiB .* only 0.00 GiB is available"):
        predictor.predict_file(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    parts = predictor.estimate_memory((512, 512, 200), np.diag([0.75, 0.75, 2.0, 1.0]))
    assert parts["input"] == 512 * 512 * 200 * 8
    assert "probabilities" not in parts  # labels only: no C-channel map at all


def test_checkpoint_errors(tmp_path):
    config = {"_target_": "monai.networks.blocks.Convolution", "spatial_dims": 3, "in_channels": 1,
              "out_channels": 2, "kernel_size": 1, "conv_only": True}  # fmt: skip
    state = build_network({"network": config}, load_weights=False).state_dict()
    save_checkpoint(tmp_path / "nopre.pt", network=config, state_dict=state, stage="finetune")
    with pytest.raises(CheckpointError, match="preprocessing"):
        Predictor(tmp_path / "nopre.pt")
    ssl = {"_target_": "monai.networks.nets.ViTAutoEnc", "in_channels": 1, "img_size": 32, "patch_size": 16,
           "hidden_size": 32, "mlp_dim": 64, "num_layers": 1, "num_heads": 2}  # fmt: skip
    pre = preprocessing_summary(spacing=MODEL_SPACING, a_min=0, a_max=1, roi_size=[16, 16, 16])
    state = build_network({"network": ssl}, load_weights=False).state_dict()
    save_checkpoint(tmp_path / "ssl.pt", network=ssl, state_dict=state, stage="ssl_pretrain", preprocessing=pre)
    with pytest.raises(CheckpointError, match="not a segmentation checkpoint"):
        Predictor(tmp_path / "ssl.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        Predictor(tmp_path / "missing.pt")


@pytest.mark.parametrize(
    "bad", [{"overlap": 1.0}, {"sw_batch_size": 0}, {"mode": "mean"}, {"precision": "fp8"}, {"interpolation": "cubic"}]
)
def test_bad_options(threshold_model, bad):
    from medssl.errors import ConfigError

    with pytest.raises(ConfigError, match=str(list(bad.values())[0])):
        Predictor(threshold_model, **bad)


def test_largest_components_keeps_the_biggest_blob_per_class():
    labels = np.zeros((20, 20, 20), np.uint8)
    labels[1:6, 1:6, 1:6] = 1  # 125 voxels
    labels[10:12, 10:12, 10:12] = 1  # 8 voxels, another component of class 1
    labels[15:18, 15:18, 15:18] = 2
    labels[0, 19, 19] = 2  # 1 voxel
    out = largest_components(labels.copy())
    assert (out == 1).sum() == 125 and (out == 2).sum() == 27
    assert out[11, 11, 11] == 0 and out[0, 19, 19] == 0 and out[3, 3, 3] == 1


def test_nifti2_and_trailing_singleton_inputs(tmp_path, threshold_model):
    """(x, y, z, 1) NIfTI and NIfTI-2 inputs: 3D NIfTI-1 outputs (readable by ITK) on the same grid."""
    shape = (14, 16, 10)
    affine = _affine(np.diag([-1.0, -1.0, 1.0]), MODEL_SPACING, shape)
    data = _blob(shape, affine)
    nib.save(nib.Nifti1Image(data[..., None], affine), tmp_path / "s4.nii.gz")
    nib.save(nib.Nifti2Image(data, affine), tmp_path / "n2.nii")
    Predictor(threshold_model, precision="fp32", progress=False).predict_paths(tmp_path, tmp_path / "out")
    for name in ("s4", "n2"):
        out = tmp_path / "out" / f"{name}_seg.nii.gz"
        img = nib.load(out)
        assert isinstance(img, nib.Nifti1Image) and img.shape == shape
        assert np.allclose(img.affine, affine, atol=1e-4)
        assert np.array_equal(np.asanyarray(img.dataobj), data > 500)
        assert sitk.ReadImage(str(out)).GetSize() == shape
