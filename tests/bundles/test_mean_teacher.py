"""bundles/mean_teacher.yaml (+ tiny.yaml, + the BTCV overlay) end to end on small phantoms, and its handlers."""

from __future__ import annotations

import copy
import csv
import types
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events

from medssl.checkpoint import build_network, load_checkpoint, save_checkpoint
from medssl.handlers import BatchNormRecalibration, BestOfCheckpoint, ValidationLog
from medssl.losses.consistency import ConsistencyWeight
from tests.bundles.bundle_helpers import overrides as bundle_overrides
from tests.bundles.bundle_helpers import tensorboard_scalars

REPO = Path(__file__).resolve().parents[2]
BUNDLE = str(REPO / "bundles" / "mean_teacher.yaml")
BTCV = str(REPO / "bundles" / "mean_teacher_btcv.yaml")
TINY = str(REPO / "bundles" / "tiny.yaml")
# tiny.yaml: 32^3 crops, batch 2 (so 1 labeled + 1 unlabeled), 4 iterations, validation every iteration;
# the ramp-up and lr step are shortened so their values change within those iterations
SMALL = {"base_filters": 8, "consistency_rampup": 4.0, "consistency_rampup_unit": 1, "lr_step_iterations": 2}


def _overrides(data: Path, out: Path, **extra) -> dict:
    return bundle_overrides(data, out, **SMALL, **extra)


def _workflow(configs, data: Path, out: Path, **extra):
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(config_file=configs, workflow_type="train", **_overrides(data, out, **extra))
    wf.initialize()
    return wf


@pytest.fixture(scope="module")
def la_data(la_phantom) -> Path:
    """The session LA phantom (64 x 64 x 40): 3 labeled training, 2 unlabeled, 1 validation volume."""
    return Path(la_phantom).parent


@pytest.fixture(scope="module")
def tiny_run(la_data, tmp_path_factory) -> Path:
    from monai.bundle import run

    out = tmp_path_factory.mktemp("mt_run") / "out"
    run("training", config_file=[BUNDLE, TINY], **_overrides(la_data, out))
    return out


def test_tiny_run_writes_student_and_teacher_checkpoints(tiny_run):
    for name in ("model.pt", "model_student.pt", "model_teacher.pt", "last.pt", "val_metrics.csv"):
        assert (tiny_run / name).is_file(), name
    rows = ValidationLog.read(tiny_run / "val_metrics.csv")
    assert [int(r["iteration"]) for r in rows] == [1, 2, 3, 4]
    assert not any(k.startswith("val_mean_dice_tutorial") for k in rows[0])  # LA: the organ mean only
    student = [r["val_mean_dice/student"] for r in rows]
    teacher = [r["val_mean_dice/teacher"] for r in rows]

    ckpts = {n: load_checkpoint(tiny_run / f"model_{n}.pt") for n in ("student", "teacher")}
    assert ckpts["student"]["best"]["value"] == pytest.approx(max(student))
    assert ckpts["teacher"]["best"]["value"] == pytest.approx(max(teacher))
    assert ckpts["teacher"]["best"]["network"] == "teacher"
    best = load_checkpoint(tiny_run / "model.pt")
    winner = best["best"]["network"]
    assert best["best"]["value"] == pytest.approx(max(student + teacher))
    assert best["best"]["value"] == pytest.approx(ckpts[winner]["best"]["value"])
    for k, v in ckpts[winner]["state_dict"].items():  # the same iteration's weights of the same network
        assert torch.equal(best["state_dict"][k], v), k
    for ckpt in (best, *ckpts.values()):
        assert ckpt["stage"] == "mean_teacher"
        assert ckpt["network"]["_target_"] == "medssl.networks.vnet.VNet" and ckpt["network"]["base_filters"] == 8
        assert ckpt["preprocessing"]["intensity"]["kind"] == "zscore"
        assert ckpt["labels"] == {"0": "background", "1": "left atrium"}
    out = build_network(best).eval()(torch.randn(1, 1, 32, 32, 32))
    assert out.shape == (1, 2, 32, 32, 32)

    last = load_checkpoint(tiny_run / "last.pt")
    assert last["progress"] == {"epoch": 2, "iteration": 4}  # 3 iterations per epoch: stopped inside epoch 2
    assert {"teacher", "optimizer", "scheduler", "best_model", "best_teacher", "rng", "transform_rng"} <= set(last)
    assert last["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.01 * 0.1 ** (4 // 2))
    # the EMA teacher is its own set of weights, not the student's
    assert any(not torch.equal(last["teacher"][k], v) for k, v in last["state_dict"].items() if v.is_floating_point())
    assert last["best_model"] == best["best"]


def test_tiny_run_tensorboard(tiny_run):
    scalars = tensorboard_scalars(tiny_run)
    assert {"loss", "supervised", "consistency", "consistency_weight"} <= set(scalars)
    for name in ("student", "teacher"):
        assert [s for s, _ in scalars[f"val_mean_dice/{name}"]] == [1, 2, 3, 4]
    weight = ConsistencyWeight(0.1, SMALL["consistency_rampup"], SMALL["consistency_rampup_unit"])
    logged = sorted(scalars["consistency_weight"])
    assert [s for s, _ in logged] == [1, 2, 3, 4]
    assert [v for _, v in logged] == pytest.approx([weight(step - 1) for step, _ in logged], rel=1e-6)
    assert logged[-1][1] > logged[0][1]


def test_resume_restores_the_teacher_exactly(la_data, tmp_path):
    """3 iterations (one epoch), then resume to 6: teacher restored bit for bit, and the same end as 6 straight."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    # fp32: the bit-for-bit comparison is about resume; oneDNN's bf16 V-Net kernels on an AVX512-BF16 Zen 5 differ
    # in the last bits between the straight and the resumed run (fp32 ones do not), which precision auto may pick
    common = {"val_interval": 3, "precision": "fp32"}
    _workflow([BUNDLE, TINY], la_data, straight, max_iterations=6, **common).run()
    _workflow([BUNDLE, TINY], la_data, split, max_iterations=3, **common).run()
    saved = load_checkpoint(split / "last.pt")
    assert saved["progress"] == {"epoch": 1, "iteration": 3}
    # an earlier continuation validated at iteration 6 and was killed before its next last.pt (Mean Teacher saves
    # it every checkpoint_interval epochs): its row must not stay beside the resumed run's own row 6
    with open(split / "val_metrics.csv", newline="") as f:
        header, first = list(csv.reader(f))[:2]
    with open(split / "val_metrics.csv", "a", newline="") as f:
        csv.writer(f).writerow(["6", "2"] + ["0.123"] * (len(header) - 2))

    wf = _workflow([BUNDLE, TINY], la_data, split, max_iterations=6, resume=True, **common)
    trainer = wf.parser.get_parsed_content("train#trainer")
    seen = {}

    @trainer.on(Events.STARTED)
    def _after_restore(engine):  # registered after the checkpoint handler's restore
        seen["iteration"] = engine.state.iteration
        seen["teacher"] = copy.deepcopy(engine.teacher.state_dict())

    wf.run()
    assert seen["iteration"] == 3
    rows = ValidationLog.read(split / "val_metrics.csv")
    assert [int(r["iteration"]) for r in rows] == [3, 6]  # resume appends to the first run's rows, once
    assert rows[0]["val_mean_dice/student"] == pytest.approx(float(first[header.index("val_mean_dice/student")]))
    assert rows[1]["val_mean_dice/student"] != pytest.approx(0.123)
    # validation at iteration 6 used the teacher's weights with re-estimated BatchNorm statistics
    teacher, teacher_eval = trainer.teacher, wf.parser.get_parsed_content("teacher_eval")
    for k, v in teacher.named_parameters():
        assert torch.equal(dict(teacher_eval.named_parameters())[k], v), k
    stats = [k for k in teacher.state_dict() if k.endswith("running_var")]
    assert stats and all(not torch.equal(teacher_eval.state_dict()[k], teacher.state_dict()[k]) for k in stats)
    assert seen["teacher"].keys() == saved["teacher"].keys()
    for k, v in saved["teacher"].items():
        assert torch.equal(seen["teacher"][k], v), k
    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(split / "last.pt")
    assert a["progress"] == b["progress"] == {"epoch": 2, "iteration": 6}
    for key in ("state_dict", "teacher"):
        for k, v in a[key].items():
            torch.testing.assert_close(b[key][k], v, rtol=0, atol=0, msg=f"{key}: {k}")
    assert b["best_model"]["iteration"] in (3, 6) and a["best_model"] == b["best_model"]


def test_btcv_unetr_switch_with_pretrained_vit(ct_phantom, tmp_path):
    """The overlay builds a UNETR whose ViT is the SSL checkpoint's, and trains it with Mean Teacher."""
    from monai.networks.nets import ViTAutoEnc

    vit_cfg = {
        "_target_": "monai.networks.nets.ViTAutoEnc",
        "in_channels": 1,
        "img_size": [32, 32, 32],
        "patch_size": 16,
        "hidden_size": 96,
        "mlp_dim": 192,
        "num_layers": 2,
        "num_heads": 4,
        "proj_type": "conv",
    }
    torch.manual_seed(3)
    vit = ViTAutoEnc(**{k: v for k, v in vit_cfg.items() if k != "_target_"})
    ckpt = save_checkpoint(tmp_path / "ssl.pt", network=vit_cfg, state_dict=vit.state_dict(), stage="ssl_pretrain")

    out = tmp_path / "out"
    wf = _workflow([BUNDLE, BTCV, TINY], Path(ct_phantom).parent, out, pretrained_ckpt=str(ckpt))
    student = wf.parser.get_parsed_content("network")
    teacher = wf.parser.get_parsed_content("teacher")
    source = vit.state_dict()
    encoder = {k: v for k, v in student.state_dict().items() if k.startswith("vit.")}
    assert len(encoder) > 10
    for k, v in encoder.items():
        assert torch.equal(v, source[k[len("vit.") :]]), k
        assert torch.equal(teacher.state_dict()[k], v), k  # the teacher starts from the pretrained student
    wf.run()

    best = load_checkpoint(out / "model.pt")
    assert best["network"]["_target_"] == "medssl.networks.unetr.UNETR"
    assert best["network"]["out_channels"] == 14 and best["network"]["hidden_size"] == 96
    assert best["preprocessing"]["intensity"]["a_min"] == -175.0 and best["preprocessing"]["spacing"] == [1.5, 1.5, 2.0]
    assert len(best["labels"]) == 14
    assert build_network(best).eval()(torch.rand(1, 1, 32, 32, 32)).shape == (1, 14, 32, 32, 32)
    last = load_checkpoint(out / "last.pt")
    assert last["progress"]["iteration"] == 4 and "teacher" in last
    assert not torch.equal(last["state_dict"]["vit.blocks.0.mlp.linear1.weight"], source["blocks.0.mlp.linear1.weight"])
    # the MONAI tutorial's include-background Dice is logged beside ours for both networks (BTCV overlay only)
    rows = ValidationLog.read(out / "val_metrics.csv")
    for name in ("student", "teacher"):
        tutorial = [float(r[f"val_mean_dice_tutorial/{name}"]) for r in rows]
        organs = [float(r[f"val_mean_dice/{name}"]) for r in rows]
        assert rows and all(0.0 <= t <= 1.0 for t in tutorial)
        assert tutorial != organs  # background included: another number


def test_full_recipe_defaults(tmp_path):
    """Without overlays the bundle holds the UA-MT left-atrium recipe."""
    from monai.bundle import ConfigParser

    p = ConfigParser()
    p.read_config(BUNDLE)
    p["bundle_root"] = str(tmp_path)
    expect = {
        "roi_size": [112, 112, 80],
        "batch_size": 4,
        "max_iterations": 6000,
        "max_epochs": None,
        "learning_rate": 0.01,
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "lr_step_iterations": 2500,
        "lr_gamma": 0.1,
        "consistency_type": "mse",
        "consistency": 0.1,
        "consistency_rampup": 40.0,
        "consistency_rampup_unit": 150,
        "ema_decay": 0.99,
        "ema_buffers": True,
        "uncertainty": False,
        "dice_squared": False,
        "noise_std": 0.1,
        "noise_clip": 0.2,
        "num_classes": 2,
        "pretrained_ckpt": None,
        "resume": False,
    }
    assert {k: p[k] for k in expect} == expect
    assert p.get_parsed_content("labeled_batch_size") == 2
    loss = p.get_parsed_content("loss")
    assert (loss.lambda_ce, loss.lambda_dice) == (0.5, 0.5)
    assert p.get_parsed_content("network_def").func.__name__ == "VNet"
    btcv = ConfigParser()
    btcv.read_config([BUNDLE, BTCV])
    assert btcv["network_def"]["_target_"] == "medssl.networks.unetr.UNETR" and btcv["num_classes"] == 14


# ------------------------------------------------------------------------------------------------ handlers


class _Evaluator:
    def __init__(self):
        self.state = types.SimpleNamespace(metrics={})
        self.handlers = []

    def add_event_handler(self, event, handler):
        self.handlers.append(handler)

    def report(self, value):
        self.state.metrics = {"val_mean_dice": value}
        for h in self.handlers:
            h(self)


def test_best_of_checkpoint_picks_across_candidates_and_ignores_the_start(tmp_path):
    nets = {"teacher": torch.nn.Linear(2, 2), "student": torch.nn.Linear(2, 2)}
    evs = {"teacher": _Evaluator(), "student": _Evaluator()}
    cfg = {"_target_": "torch.nn.Linear", "in_features": 2, "out_features": 2}
    best = BestOfCheckpoint(tmp_path / "model.pt", nets, evs, cfg, "mean_teacher")
    # per iteration: (teacher, student) Dice; None = no validation
    script = {0: (0.99, 0.99), 1: (0.2, 0.3), 2: (0.5, 0.4), 3: (0.45, 0.45)}
    engine = Engine(lambda e, b: None)
    best.attach(engine)

    def validate(e):
        t, s = script[e.state.iteration]
        evs["teacher"].report(t)
        evs["student"].report(s)

    engine.add_event_handler(Events.STARTED, validate)  # a validation at start: untrained, selects nothing
    engine.add_event_handler(Events.ITERATION_COMPLETED, validate)
    saved = {}

    def _snapshot(e):  # registered after the handler's own ITERATION_COMPLETED step, which it adds at STARTED
        e.add_event_handler(
            Events.ITERATION_COMPLETED,
            lambda e: saved.setdefault(e.state.iteration, load_checkpoint(tmp_path / "model.pt")),
        )

    engine.add_event_handler(Events.STARTED, _snapshot)
    engine.run([0, 1, 2], max_epochs=1)
    assert saved[1]["best"]["network"] == "student" and saved[1]["best"]["value"] == 0.3
    ckpt = load_checkpoint(tmp_path / "model.pt")
    assert ckpt["best"] == {
        "metric": "val_mean_dice",
        "value": 0.5,
        "epoch": 1,
        "iteration": 2,
        "network": "teacher",
        "selected_by": "best",
    }
    for k, v in nets["teacher"].state_dict().items():
        assert torch.equal(ckpt["state_dict"][k], v)
    restored = BestOfCheckpoint(tmp_path / "x.pt", nets, evs, cfg, "mean_teacher")
    restored.load_state_dict(best.state_dict())
    assert restored.best == best.best
    with pytest.raises(ValueError, match="same names"):
        BestOfCheckpoint(tmp_path / "m.pt", nets, {"teacher": evs["teacher"]}, cfg, "s")
    with pytest.raises(ValueError, match="'median'"):
        BestOfCheckpoint(tmp_path / "m.pt", nets, evs, cfg, "s", mode="median")


def test_batchnorm_recalibration_matches_a_naive_average():
    def net():
        return torch.nn.Sequential(torch.nn.BatchNorm3d(2), torch.nn.Dropout3d(0.9), torch.nn.Conv3d(2, 2, 1))

    torch.manual_seed(0)
    source, target = net(), net()
    with torch.no_grad():
        source[0].running_mean.fill_(5.0)  # EMA'd statistics that do not fit the data
        source[0].running_var.fill_(9.0)
    before = copy.deepcopy(source.state_dict())
    batches = [{"image": torch.randn(3, 2, 4, 4, 4) * (i + 1) + i} for i in range(4)]
    handler = BatchNormRecalibration(source, target, batches, num_batches=3)
    assert handler() == 3
    for k, v in before.items():  # the source (the training teacher) is untouched
        assert torch.equal(source.state_dict()[k], v), k
    for k, v in source.named_parameters():
        assert torch.equal(dict(target.named_parameters())[k], v), k
    x = [b["image"] for b in batches[:3]]
    mean = torch.stack([b.mean(dim=(0, 2, 3, 4)) for b in x]).mean(0)
    var = torch.stack([b.transpose(0, 1).reshape(2, -1).var(dim=1, unbiased=True) for b in x]).mean(0)
    torch.testing.assert_close(target[0].running_mean, mean)
    torch.testing.assert_close(target[0].running_var, var)
    assert not target.training and not target[0].training and target[0].momentum == source[0].momentum
    with pytest.raises(ValueError, match="no batch"):
        BatchNormRecalibration(source, target, [])()
    with pytest.raises(ValueError, match="interval"):
        BatchNormRecalibration(source, target, batches, interval=0)
