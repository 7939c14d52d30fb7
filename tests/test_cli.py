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


def test_demo_length_error_says_which_lengths_work(capsys):
    for bad in ("500", "128", "100000", "abc"):
        with pytest.raises(SystemExit) as e:
            cli.main(["demo", "--kernels-only", "--length", bad])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "argument --length: expected a multiple of 16 in [256, 8192]" in err
        assert "Traceback" not in err and len(err.strip().splitlines()[-1]) < 120
    with pytest.raises(ValueError, match="multiple of 16"):
        cli.kernel_demo(None, T=500)


def test_demo_out_must_be_a_folder(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--kernels-only", "--out", str(f)])
    assert e.value.code == 2 and "--out" in capsys.readouterr().err


def test_eval_method_config_and_paths_errors(tmp_path, capsys):
    missing = tmp_path / "nonexistent.json"
    assert cli.main(["eval", "--method-config", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and str(missing) in err and "not valid JSON" not in err
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\x80\xff\x00" * 10)
    assert cli.main(["eval", "--method-config", str(binary)]) == 2
    assert str(binary) in capsys.readouterr().err
    trunc = tmp_path / "t.json"
    trunc.write_text('{"a_shape": {"n_init": 4')
    assert cli.main(["eval", "--method-config", str(trunc)]) == 2
    err = capsys.readouterr().err
    assert "not valid JSON" in err and str(trunc) in err
    f = tmp_path / "file"
    f.write_text("x")
    assert cli.main(["eval", "--out", str(f)]) == 2
    assert "--out" in capsys.readouterr().err
    assert cli.main(["eval", "--device", "bogus"]) == 2
    assert "--device" in capsys.readouterr().err


def test_value_errors_of_subcommands_are_one_line_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SPARSATTN_TRACEBACK", raising=False)
    assert cli.main(["bench", "kv-memory", "--lengths", "abc", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparsattn bench kv-memory: error:") and "Traceback" not in err
    monkeypatch.setenv("SPARSATTN_TRACEBACK", "1")
    with pytest.raises(ValueError):
        cli.main(["bench", "kv-memory", "--lengths", "abc", "--out", str(tmp_path)])
