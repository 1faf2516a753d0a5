import subprocess
import sys

import pytest
import torch

from medssl.checkpoint import build_network, save_checkpoint
from medssl.cli import build_parser, main


def _subcommands() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


@pytest.mark.parametrize("command", _subcommands())
def test_every_subcommand_has_help_with_an_example(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    # the usage line always names the command: the example itself must, after "example:"
    example = text.split("example:", 1)[1].strip()
    assert example.startswith(f"medssl {command} "), example


def test_user_error_is_one_line_and_exit_2(tmp_path, capsys):
    missing = tmp_path / "nope.pt"
    assert main(["inspect", str(missing)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"medssl: error: {missing}: checkpoint file does not exist"]


def test_console_entry_point_runs_as_module():
    proc = subprocess.run([sys.executable, "-m", "medssl", "--version"], capture_output=True, text=True, check=True)
    assert proc.stdout.startswith("medssl ")


def _vnet_checkpoint(path) -> torch.nn.Module:
    config = {"_target_": "medssl.networks.vnet.VNet", "in_channels": 1, "out_channels": 2, "base_filters": 4}
    net = build_network({"network": config}, load_weights=False)
    save_checkpoint(path, network=config, state_dict=net.state_dict(), stage="finetune")
    return net


def test_cli_export_state_dict(tmp_path, capsys):
    net = _vnet_checkpoint(tmp_path / "model.pt")
    out = tmp_path / "model_sd.pt"
    assert main(["export", str(tmp_path / "model.pt"), "--state-dict", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    state = torch.load(out, weights_only=True)
    assert state.keys() == net.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())


def test_cli_export_needs_an_output(tmp_path, capsys):
    _vnet_checkpoint(tmp_path / "model.pt")
    assert main(["export", str(tmp_path / "model.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["medssl: error: medssl export: nothing to write: give --torchscript FILE and/or --state-dict FILE"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
