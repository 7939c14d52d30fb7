"""The command line hands options to the pass-through sub-commands (eval, train-lm, bench decode /
kv-memory) and refuses unknown options elsewhere."""
import pytest

from sparsattn import cli


def test_pass_through_options_reach_the_subcommand(tmp_path, capsys):
    assert cli.main(["bench", "kv-memory", "--lengths", "256", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "kv_memory.csv").is_file()
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", "--help"])
    assert e.value.code == 0 and "--methods" in capsys.readouterr().out


def test_unknown_option_elsewhere_is_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["list", "--bogus"])
    assert e.value.code == 2 and "--bogus" in capsys.readouterr().err
