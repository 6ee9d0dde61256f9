"""cli.main: every subcommand explains itself, and a failing stage ends with a readable error and status 1."""

import argparse

import pytest

from cli.main import build_parser, main

COMMANDS = {"store", "download", "precompute", "encode", "train", "export", "evaluate", "generate", "demo", "serve",
            "plan", "reproduce"}


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_every_stage_has_a_subcommand_with_help_and_a_handler():
    subs = subcommands(build_parser())
    assert set(subs) == COMMANDS
    for name, sub in subs.items():
        if name == "store":
            sub = subcommands(sub)["inspect"]
        assert sub.description, name  # `--help` says what the stage does, not only its flags
        assert callable(sub.get_default("func")), name


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_exits_zero(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([name, "--help"])
    assert exit_.value.code == 0 and "usage: eclipse-prior " + name in capsys.readouterr().out


def test_train_choices_come_from_the_library():
    from training.objectives import OBJECTIVES
    from training.prior import PRIOR_PRESETS

    train = subcommands(build_parser())["train"]
    choices = {a.dest: a.choices for a in train._actions if a.choices}
    assert tuple(choices["objective"]) == OBJECTIVES and list(choices["preset"]) == list(PRIOR_PRESETS)


def test_a_stage_error_is_one_line_and_status_1(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ECLIPSE_PRIOR_DEBUG", raising=False)
    missing = tmp_path / "no-run"
    assert main(["export", str(missing), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(missing) in err and "Traceback" not in err
    monkeypatch.setenv("ECLIPSE_PRIOR_DEBUG", "1")  # the traceback on request
    with pytest.raises(Exception, match="no-run"):
        main(["export", str(missing), "--out", str(tmp_path / "out")])
