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


def test_flag_defaults_and_the_defaults_their_help_names_are_the_library_configs():
    """No default is written twice: a flag named after a config field takes its default from the config, and a
    help text's "(default X)" shows it; a literal that drifts from the config fails here."""
    import dataclasses
    import re

    from evaluation.evaluate import EvalConfig
    from flows.params import ClusterParams, DownloadParams, EncodeParams, TrainParams
    from pipeline.cluster import ClusterConfig
    from pipeline.download import DownloadConfig
    from pipeline.encode import EncodeConfig
    from training.config import TrainConfig, config_default

    subs = subcommands(build_parser())
    configs = {"download": [DownloadConfig], "precompute": [DownloadConfig, EncodeConfig, ClusterConfig],
               "encode": [EncodeConfig, ClusterConfig], "evaluate": [EvalConfig], "train": [TrainConfig]}
    checked = 0
    for command, classes in configs.items():
        fields = {f.name: cls for cls in classes for f in dataclasses.fields(cls)}
        for action in subs[command]._actions:
            cls = fields.get(action.dest)
            if cls is None or action.dest in ("store", "out", "priors", "encoder", "device", "dtype", "preset"):
                continue
            want = config_default(cls, action.dest)
            if action.default is not None:  # train's flags default to None: the config fills them in
                assert action.default == want, (command, action.dest)
            shown = re.search(r"\(default:? ([^;),]+)", action.help or "")
            if shown and want is not None:  # a None default is described in words ("3 x --timeout")
                assert shown[1] in (str(want), f"{want:g}" if isinstance(want, float) else str(want)), \
                    (command, action.dest, shown[1], want)
            checked += 1
    assert checked >= 15
    assert subs["download"].get_default("max_image_mib") << 20 == config_default(DownloadConfig, "max_image_bytes")
    # the flows' typed parameters take the same defaults (TrainParams.progress differs on purpose)
    for params, cls in ((DownloadParams, DownloadConfig), (EncodeParams, EncodeConfig),
                        (ClusterParams, ClusterConfig), (TrainParams, TrainConfig)):
        names = {f.name for f in dataclasses.fields(cls)} - {"progress", "processes_count"}
        for name, info in params.model_fields.items():
            if name in names:
                assert info.get_default(call_default_factory=True) == config_default(cls, name), (params, name)


def test_the_commands_agree_with_each_other(capsys):
    from cli.main import DESCRIPTION

    listed = {line.split()[0] for line in DESCRIPTION.splitlines() if line.startswith("  ")}
    assert listed == COMMANDS  # the stage list names every subcommand
    parser = build_parser()
    # download takes the url list as precompute does (--urls), and positionally as before
    assert parser.parse_args(["download", "--urls", "a.csv", "--out", "o"]).urls_flag == "a.csv"
    assert parser.parse_args(["download", "a.csv", "--out", "o"]).urls == "a.csv"
    # plan takes lists as reproduce does (spaces), and with commas as before
    assert main(["plan", "--datasets", "mscoco", "cc3m", "--decoders", "karlo", "--json"]) == 0
    spaced = capsys.readouterr().out
    assert main(["plan", "--datasets", "mscoco,cc3m", "--decoders", "karlo", "--json"]) == 0
    assert capsys.readouterr().out == spaced and '"mscoco"' in spaced and '"cc3m"' in spaced


def test_a_stage_error_is_one_line_and_status_1(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ECLIPSE_PRIOR_DEBUG", raising=False)
    missing = tmp_path / "no-run"
    assert main(["export", str(missing), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(missing) in err and "Traceback" not in err
    monkeypatch.setenv("ECLIPSE_PRIOR_DEBUG", "1")  # the traceback on request
    with pytest.raises(Exception, match="no-run"):
        main(["export", str(missing), "--out", str(tmp_path / "out")])
