import subprocess
import sys

import pytest

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
