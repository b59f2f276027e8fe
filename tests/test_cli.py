"""Issue 18: a CLI that explains itself -- help and defaults for every flag, environment variables in the
epilogs, -v / -q / EDGEPIPE_LOG, `edgepipe info`, `--set` with list indices and errors that name it,
close-match hints, bench --variant / --backend."""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import threading

import pytest

from edgepipe import log
from edgepipe.cli import build_parser, main as cli_main, missing_extra_line
from edgepipe.recipe import RecipeError, load_recipe, recipe_from_dict

ENV_VARS = ("EDGEPIPE_THREADS", "EDGEPIPE_OV_HINT", "EDGEPIPE_OV_DEVICE", "EDGEPIPE_LOG", "EDGEPIPE_TRUSTED_KEYS")


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_flag_has_help_and_the_env_variables_are_documented():
    parsers = subcommands()
    assert {"run", "eval", "bench", "info", "demo", "build-engine", "camera"} <= set(parsers)
    for name, parser in parsers.items():
        if name in ("camera", "serve"):  # pass everything to camera.py's parser, which has its own --help
            continue
        for action in parser._actions:
            if action.option_strings and action.help != argparse.SUPPRESS:
                assert action.help, f"edgepipe {name} {action.option_strings[0]} has no help text"
        text = parser.format_help()
        assert all(v in text for v in ENV_VARS), f"edgepipe {name} --help does not list the environment variables"
    help_of = {name: " ".join(parser.format_help().split()) for name, parser in parsers.items()}  # unwrapped
    assert "(default: 200)" in help_of["bench"] and "(default: 20)" in help_of["bench"]
    assert "(default: 8)" in help_of["eval"] and "(default: auto)" in help_of["eval"]
    assert "(default: fp16)" in help_of["build-engine"]
    assert all(v in build_parser().format_help() for v in ENV_VARS)



def test_serve_help_lists_the_environment_variables(capsys):
    """`edgepipe serve --help` is camera.py's parser under another name: its epilog too."""
    from edgepipe.runtime.camera import parse_args
    with pytest.raises(SystemExit):
        parse_args(["--help"], prog="edgepipe serve")
    text = capsys.readouterr().out
    assert "usage: edgepipe serve" in text and all(v in text for v in ENV_VARS)


def test_camera_help_shows_defaults_and_environment(capsys):
    from edgepipe.runtime.camera import parse_args
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 5.0)" in text and "(default: 10)" in text  # --read-timeout, --max-reconnects
    assert all(v in text for v in ENV_VARS)


@pytest.mark.parametrize(("verbose", "quiet", "env", "level"), [
    (0, 0, None, logging.INFO), (1, 0, None, logging.DEBUG), (0, 1, None, logging.WARNING), (0, 2, None, logging.ERROR),
    (0, 0, "warning", logging.WARNING), (1, 0, "error", logging.DEBUG), (0, 1, "debug", logging.WARNING)])
def test_verbosity_flags_override_edgepipe_log(verbose, quiet, env, level):
    assert log.level_from(verbose, quiet, {"EDGEPIPE_LOG": env} if env else {}) == level


def test_quiet_silences_progress_only(capsys):
    try:
        log.configure(logging.WARNING)
        log.progress("step 1")
        assert capsys.readouterr().out == ""
        log.configure(logging.INFO)
        log.progress("step 1")
        log.debug("detail")
        assert capsys.readouterr().out == "step 1\n"
    finally:
        log.configure(logging.INFO)


def test_bad_edgepipe_log_is_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("EDGEPIPE_LOG", "loud")
    assert cli_main(["info", str(tmp_path)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "EDGEPIPE_LOG='loud'" in line and "debug, info, warning, error" in line


def test_missing_build_module_names_the_extra():
    line = missing_extra_line("run", ModuleNotFoundError("No module named 'pydantic'", name="pydantic"))
    assert line == "`edgepipe run` needs the build extras (pydantic is not installed here): pip install 'edgepipe[full]'"
    assert "edgepipe[bench]" in missing_extra_line("bench", ModuleNotFoundError(name="matplotlib.pyplot"))
    assert missing_extra_line("run", ModuleNotFoundError(name="edgepipe.nothing")) is None


# ------------------------------------------------------------------ --set and profiles

def test_set_indexes_lists_and_names_itself_in_errors():
    recipe = load_recipe("default", overrides=["targets.0.precision=int8", "targets.-1.backend=onnxruntime"])
    assert recipe.targets[0].precision == "int8" and recipe.targets[-1].backend == "onnxruntime"
    # a list the file leaves at its default is indexed too
    assert recipe_from_dict({}, overrides=["targets.1.precision=int8"]).targets[1].precision == "int8"
    cases = {
        "targets.7.precision=int8": "--set targets.7.precision=int8: targets has 3 item(s)",
        "targets.first.precision=int8": "targets is a list; index it with a number",
        "stages.quantise.enabled=false": "--set stages.quantise.enabled=false: unknown key 'stages.quantise' (did you mean 'quantize'?)",
        "targets.0.precision=int9": "--set targets.0.precision=int9: targets.0.precision: Input should be",
        "data.evaluation=/no/such.csv": "--set data.evaluation=/no/such.csv: data.evaluation: /no/such.csv does not exist",
        "model.name.size=3": "model.name is a value",
    }
    for assignment, expected in cases.items():
        with pytest.raises(RecipeError) as exc:
            load_recipe("default", overrides=[assignment])
        assert expected in str(exc.value), str(exc.value)


def test_recipe_file_mistakes_still_name_the_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("stages: {quantise: {enabled: true}}\n")
    with pytest.raises(RecipeError, match=rf"^{path}: unknown key 'stages.quantise'"):
        load_recipe(path, overrides=["targets.0.precision=int8"])


def test_profile_typo_gets_a_close_match():
    with pytest.raises(RecipeError, match=r"no profile 'quik' \(did you mean 'quick'\?\)"):
        load_recipe("fashion-mnist", profile="quik")
    with pytest.raises(RecipeError, match=r"did you mean --profile quick of the built-in recipe fashion-mnist"):
        load_recipe("default", profile="quik")


# ------------------------------------------------------------------ info, bench filters

def test_info_lists_variants_and_what_auto_serves(tiny_artifacts, capsys):
    assert cli_main(["info", str(tiny_artifacts)]) == 0
    text = capsys.readouterr().out
    for name in ("onnxruntime-fp32", "openvino-fp32", "openvino-int8"):
        assert name in text
    assert "auto serves here: " in text and "device records:" in text
    assert cli_main(["info", str(tiny_artifacts), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {v["name"] for v in info["variants"]} == {"onnxruntime-fp32", "openvino-fp32", "openvino-int8"}
    assert info["auto"]["backend"] in info["installed_backends"] and info["auto"]["reason"]
    if not info["device_records"]:  # without `edgepipe verify` here, auto serves a build-host default
        assert info["auto"]["variant"] in info["defaults"].values()
    assert all(v["size_mb"] > 0 and v["status"] == "ok" for v in info["variants"])   # each passed its checks


def test_bench_filter_typos_exit_2_before_measuring(tiny_artifacts, capsys):
    """(the filters themselves, -q and the recorded command run in test_device_install.py, without PyTorch)"""
    assert cli_main(["bench", str(tiny_artifacts), "--variant", "openvino-int9"]) == 2
    assert "(did you mean 'openvino-int8'?)" in capsys.readouterr().err
    assert cli_main(["bench", str(tiny_artifacts), "--backend", "openvno"]) == 2
    assert "(did you mean 'openvino'?)" in capsys.readouterr().err
    assert cli_main(["bench", str(tiny_artifacts), "--variant", "onnxruntime-*", "--backend", "tensorrt"]) == 2
    assert "leaves nothing to measure" in capsys.readouterr().err


def test_demo_runs_outside_the_checkout(tiny_recipe, tiny_artifacts, tmp_path):
    """`edgepipe demo` needs no repository paths: run from another folder, on a copy of a built folder (its
    steps are reused), it classifies the generated sample video and says where everything is."""
    out = tmp_path / "demo-out"
    shutil.copytree(tiny_artifacts, out)
    proc = subprocess.run([sys.executable, "-m", "edgepipe", "demo", "--recipe", str(tiny_recipe), "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    frames = (out / "demo" / "frames.jsonl").read_text().splitlines()
    assert frames and all(json.loads(line)["label"] for line in frames[:3])
    assert (out / "demo" / "annotated.mp4").stat().st_size > 0
    assert f"video:    {out / 'demo' / 'annotated.mp4'}" in proc.stdout


def test_an_interrupt_a_library_turns_into_its_own_error_ends_as_an_interrupt(monkeypatch, capsys):
    """Ctrl-C while an extension module is being imported surfaces as pybind11's "ImportError: initialization
    failed" (seen when `edgepipe run` was interrupted while importing openvino): still the one interrupted line
    and exit 130, no traceback. Without an interrupt the same error is not hidden."""
    import signal

    from edgepipe import cli

    def import_interrupted(args):
        try:
            cli._interrupt(signal.SIGINT, None)   # what the handler main() installs does on Ctrl-C
        except KeyboardInterrupt:
            raise ImportError("initialization failed") from None

    previous = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(cli, "cmd_models", import_interrupted)
    monkeypatch.setattr(cli, "_interrupted", threading.Event())
    try:
        assert cli.main(["models"]) == 130
        assert capsys.readouterr().err.strip() == \
            "edgepipe: interrupted; completed steps are kept and a re-run resumes from them"
        cli._interrupted.clear()
        monkeypatch.setattr(cli, "cmd_models", lambda args: (_ for _ in ()).throw(ImportError("initialization failed")))
        with pytest.raises(ImportError):
            cli.main(["models"])
    finally:
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGTERM, previous[1])
