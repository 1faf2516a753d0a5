"""btcv_unetr, la_vnet and s5cl with bundles/multi_gpu.yaml under torchrun (2 gloo ranks): they train and write once."""

from __future__ import annotations

from pathlib import Path

import pytest

from medssl.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("bundle", ["btcv_unetr", "la_vnet", "s5cl"])
def test_bundle_trains_on_two_ranks(bundle, ct_phantom, la_phantom, tmp_path, torchrun_bundle, event_pids):
    data = Path(la_phantom if bundle == "la_vnet" else ct_phantom).parent
    out = tmp_path / "out"
    proc = torchrun_bundle(bundle, data, out)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert len(event_pids(out)) == 1
    assert (out / "val_metrics.csv").is_file()
    last = load_checkpoint(out / "last.pt")
    assert last["progress"]["iteration"] >= 2 and len(last["rng_ranks"]) == 2
    model = load_checkpoint(out / "model.pt")
    assert not any(k.startswith("module.") for k in model["state_dict"])
    assert proc.stdout.count("Trainer - INFO - Engine run finished") == 1  # ranks > 0 log warnings only
