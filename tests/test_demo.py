"""make demo's own pieces (the whole demo is measured by running it: README 'What make demo shows')."""

import json

import nibabel as nib
import numpy as np
import pytest

from medssl.data.datalist import load_datalist
from medssl.data.phantoms import intensity_threshold_baseline
from medssl.demo import _best_cell, threshold_baseline


def test_threshold_baseline_is_the_mean_over_validation_cases(ct_phantom):
    dl = load_datalist(ct_phantom)
    expected = []
    for item in dl.items("validation"):
        img, lab = (np.asarray(nib.load(item[k]).dataobj) for k in ("image", "label"))
        expected.append(np.nanmean(list(intensity_threshold_baseline(img, lab, dl.labels).values())))
    assert threshold_baseline(ct_phantom) == pytest.approx(float(np.mean(expected)))
    assert 0.0 < threshold_baseline(ct_phantom) < 0.5  # the phantom is not separable by intensity


def test_best_cell_is_the_highest_mean_dice(tmp_path):
    for name, dice in (("scratch_n1_seed0", [0.2, 0.4]), ("pretrained_n1_seed0", [0.5, 0.3]), ("x_n2_seed1", [0.1])):
        (tmp_path / "cells" / name).mkdir(parents=True)
        rows = [{"dice": str(d)} for d in dice]
        (tmp_path / "cells" / name / "done.json").write_text(json.dumps({"rows": rows}))
    assert _best_cell(tmp_path).name == "pretrained_n1_seed0"
