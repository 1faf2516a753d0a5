"""medssl.compile: the ``compile`` id (auto / true / false), the in-place compiled forward and its cache folder."""

from __future__ import annotations

import logging

import pytest
import torch

from medssl import compile as mc
from medssl.errors import ConfigError

RECORDED = dict(mc.MEASURED)  # the shipped table (every test below starts from an empty one)


@pytest.fixture(autouse=True)
def _own_cache_env(monkeypatch):
    # every test starts without a cache folder of its own in the environment; monkeypatch restores the original
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setattr(mc, "_set_by_us", None)
    monkeypatch.setattr(mc, "MEASURED", {})


@pytest.mark.parametrize(
    ("value", "expected"), [(True, "true"), ("false", "false"), (False, "false"), ("AUTO", "auto"), ("on", "true")]
)
def test_parse_compile_accepts_booleans_and_their_words(value, expected):
    assert mc.parse_compile(value) == expected


def test_parse_compile_names_the_id_on_a_bad_value():
    with pytest.raises(ConfigError, match="compile"):
        mc.parse_compile("sometimes")


def test_auto_is_off_without_a_measurement_and_says_why():
    net = torch.nn.Linear(4, 2)
    on, reason = mc.resolve_compile("auto", "cpu", net, "fp32")
    assert not on
    assert mc.compile_key("cpu", net, "fp32") in reason and "no measurement" in reason
    assert not mc.resolve_compile("auto", "cpu")[0]  # no network: nothing to look up


def test_compile_key_names_the_device_kind_network_precision_and_task(monkeypatch):
    import medssl.precision as mp

    net = torch.nn.Linear(4, 2)
    monkeypatch.setattr(mp, "cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(mp, "amx_cpu", lambda: False)
    assert mc.compile_key("cpu", net, "fp32") == "cpu:AVX512/Linear/fp32/train"
    monkeypatch.setattr(mp, "amx_cpu", lambda: True)  # an AMX Xeon reports AVX512 too: a different machine
    assert mc.compile_key("cpu", "UNETR", "bf16", training=False) == "cpu:AVX512+AMX/UNETR/bf16/infer"
    assert mc.compile_key("cuda", "UNETR", "bf16") == "cuda/UNETR/bf16/train"


def test_auto_follows_a_recorded_measurement_and_the_run_length(monkeypatch):
    net = torch.nn.Linear(4, 2)  # 10 parameters
    key = mc.compile_key("cpu", net, "fp32")
    record = {"speedup": 1.5, "compile_s": 300.0, "step_s": 3.0, "params": 10}
    monkeypatch.setattr(mc, "MEASURED", {key: record})
    assert mc.resolve_compile("auto", "cpu", net, "fp32")[0]
    # the record is for fp32 training: bf16, or a forward only, is another workload
    assert not mc.resolve_compile("auto", "cpu", net, "bf16")[0]
    assert not mc.resolve_compile("auto", "cpu", net, "fp32", training=False)[0]
    # 100 steps save 100 * 3 * (1 - 1/1.5) = 100 s < 300 s of compiling: off; 1000 steps save 1000 s: on
    on, reason = mc.resolve_compile("auto", "cpu", net, "fp32", iterations=100)
    assert not on and "300 s compile" in reason
    assert mc.resolve_compile("auto", "cpu", net, "fp32", iterations=1000)[0]
    # a network of another size (a tiny test model against a measured ViT-B) is not covered by the record
    on, reason = mc.resolve_compile("auto", "cpu", torch.nn.Linear(40, 2), "fp32")
    assert not on and "parameters" in reason
    monkeypatch.setattr(mc, "cpp_compiler", lambda: None)  # auto never fails for want of a compiler
    on, reason = mc.resolve_compile("auto", "cpu", net, "fp32")
    assert not on and "C++ compiler" in reason
    monkeypatch.setattr(mc, "MEASURED", {key: {"speedup": 1.05}})
    on, reason = mc.resolve_compile("auto", "cpu", net, "fp32")
    assert not on and "1.05x, below 1.1x" in reason
    assert mc.resolve_compile("true", "cpu")[0] and not mc.resolve_compile("false", "cpu")[0]


def test_recorded_measurements_are_complete_and_keyed_like_compile_key():
    assert RECORDED, "no compile measurement recorded"
    for key, record in RECORDED.items():
        kind, network, precision, task = key.split("/")
        assert kind == "cuda" or kind.startswith("cpu:"), key
        assert precision in ("fp32", "bf16", "amp") and task in ("train", "infer"), key
        assert record["speedup"] > 0 and record["compile_s"] >= 0 and record["step_s"] > 0, key
        assert record["params"] > 0 and record["source"], key


def test_compile_false_and_auto_leave_the_module_as_it_is(caplog):
    net = torch.nn.Linear(4, 2)
    with caplog.at_level(logging.INFO, logger="medssl.compile"):
        assert mc.compile_network(net, "auto") is net
    assert "forward" not in net.__dict__
    assert "compile auto -> off" in caplog.text


def test_compile_true_without_a_cpp_compiler_is_a_config_error(monkeypatch, tmp_path):
    monkeypatch.setattr(mc, "cpp_compiler", lambda: None)
    with pytest.raises(ConfigError, match="C\\+\\+ compiler"):
        mc.compile_network(torch.nn.Linear(4, 2), "true", "cpu", tmp_path)


def test_set_cache_dir_keeps_a_users_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert mc.set_cache_dir(tmp_path / "run") == str(tmp_path / "mine")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # inductor builds C++ kernels: ~8 s on an idle 2-core CPU, a minute when loaded
@pytest.mark.skipif(mc.cpp_compiler() is None, reason="inductor on CPU needs a C++ compiler")
def test_compiled_forward_matches_eager_keeps_the_state_dict_and_caches_under_the_run(tmp_path):
    torch.manual_seed(0)
    eager = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 3))
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 3))
    net.load_state_dict(eager.state_dict())
    keys = list(net.state_dict())
    assert mc.compile_network(net, "true", "cpu", tmp_path) is net
    assert "forward" in net.__dict__ and list(net.state_dict()) == keys
    x = torch.randn(5, 8)
    torch.testing.assert_close(net(x), eager(x), rtol=1e-5, atol=1e-6)
    cache = tmp_path / mc.CACHE_SUBDIR
    assert cache.is_dir() and any(cache.rglob("*")), "inductor wrote nothing under the run's folder"


@pytest.mark.parametrize(
    "configs",
    [["ssl_pretrain.yaml"], ["supervised.yaml", "btcv_unetr.yaml"], ["supervised.yaml", "la_vnet.yaml"]],
    ids=["ssl_pretrain", "btcv_unetr", "la_vnet"],
)
def test_make_network_and_the_bundle_id_compile_only_when_asked(configs, tmp_path, repo_root, monkeypatch):
    from monai.bundle import ConfigParser

    from medssl.networks.build import make_network

    assert "forward" not in make_network(torch.nn.Linear(4, 2), compile="auto").__dict__

    def network(compile_value):
        parser = ConfigParser()
        parser.read_config([str(repo_root / "bundles" / c) for c in [*configs, "tiny.yaml"]])
        parser.update({"bundle_root": str(repo_root), "output_dir": str(tmp_path), "device": "cpu",
                       "compile": compile_value})  # fmt: skip
        return parser.get_parsed_content("network")

    default, compiled = network("auto"), network("true")
    assert "forward" not in default.__dict__  # auto: off (nothing measured), the bundle as before
    assert "forward" in compiled.__dict__ and list(compiled.state_dict()) == list(default.state_dict())
    assert (tmp_path / mc.CACHE_SUBDIR).is_dir()

    # auto looks up this network in the precision the trainer will use, and weighs tiny.yaml's 4 iterations
    from medssl.precision import resolve_precision

    key = mc.compile_key("cpu", default, resolve_precision("auto", "cpu"))
    params = sum(p.numel() for p in default.parameters())
    record = {"speedup": 2.0, "step_s": 1.0, "params": params, "source": "test"}
    monkeypatch.setattr(mc, "MEASURED", {key: {**record, "compile_s": 10.0}})  # 4 steps save 2 s < 10 s
    assert "forward" not in network("auto").__dict__
    monkeypatch.setattr(mc, "MEASURED", {key: {**record, "compile_s": 1.0}})  # 2 s > 1 s: on
    assert "forward" in network("auto").__dict__


def test_predictor_compiles_only_on_request(tmp_path):
    from bench.inference import prepare
    from medssl.inference import Predictor

    _, ckpt = prepare(tmp_path, (48, 48, 24), (1.5, 1.5, 2.0), "tiny", 32, seed=0)
    assert "forward" not in Predictor(ckpt, device="cpu", progress=False).network.__dict__
    predictor = Predictor(ckpt, device="cpu", progress=False, compile=True, compile_cache_dir=tmp_path / "c")
    assert "forward" in predictor.network.__dict__
    assert (tmp_path / "c" / mc.CACHE_SUBDIR).is_dir()


@pytest.mark.slow  # inductor builds C++ kernels: seconds on an idle 2-core CPU
@pytest.mark.skipif(mc.cpp_compiler() is None, reason="inductor on CPU needs a C++ compiler")
def test_a_metatensor_batch_compiles_as_one_graph(tmp_path):
    # MONAI loaders yield MetaTensors; traced through their __torch_function__, every op was a graph break
    from monai.data import MetaTensor
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    eager = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.InstanceNorm3d(4), torch.nn.LeakyReLU())
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.InstanceNorm3d(4), torch.nn.LeakyReLU())
    net.load_state_dict(eager.state_dict())
    mc.compile_network(net, "true", "cpu", tmp_path)
    x = MetaTensor(torch.randn(2, 1, 8, 8, 8), affine=torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0])))
    counters.clear()
    out = net(x)
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch.testing.assert_close(out, eager(x.as_tensor()), rtol=1e-5, atol=1e-5)
