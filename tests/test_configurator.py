"""configurator.py, the one flag parser: files then flags in order, text kept for strings, types checked."""

import pytest

from configurator import configure

DEFAULTS = dict(out_dir="out", lr=1e-4, steps=10, compile=True, sizes=(1, 2), names=["a"])


def test_flags_and_files_override_in_order_with_their_types(tmp_path):
    (tmp_path / "c.py").write_text("steps = 3\nlr = 2  # an integer where a number is expected\n_helper = 5\n")
    config = configure(DEFAULTS, [str(tmp_path / "c.py"), "--steps=7", "--out_dir=2024", "--compile=False",
                                  "--sizes=[3, 4]", "--names=('x', 'y')"], config_files=True)
    assert config == dict(out_dir="2024", lr=2.0, steps=7, compile=False, sizes=(3, 4), names=["x", "y"])
    assert configure(dict(attention=False), ["--attention"]) == dict(attention=True)  # a bare flag means True
    assert configure(DEFAULTS, []) == DEFAULTS


@pytest.mark.parametrize("argv, message", [
    (["--stpes=3"], "error: unknown flag --stpes; did you mean --steps? "
                    "(known: --out_dir, --lr, --steps, --compile, --sizes, --names)"),
    (["--steps=many"], "error: steps='many' should be an integer"),
    (["--compile=1"], "error: compile=1 should be True or False"),
    (["--lr=fast"], "error: lr='fast' should be a number"),
    (["config.py"], "error: unexpected argument 'config.py' (flags are --key=value)"),
])
def test_a_bad_flag_is_one_error_line(argv, message):
    with pytest.raises(SystemExit) as e:
        configure(DEFAULTS, argv)
    assert str(e.value) == message


def test_a_config_file_that_sets_an_unknown_key_or_fails_is_one_line(tmp_path):
    (tmp_path / "typo.py").write_text("step = 3\n")
    (tmp_path / "broken.py").write_text("steps = 1 / 0\n")
    for name, message in (("typo.py", "sets 'step', which is not a config key"),
                          ("broken.py", "fails: ZeroDivisionError"), ("missing.py", "no config file")):
        with pytest.raises(SystemExit) as e:
            configure(DEFAULTS, [str(tmp_path / name)], config_files=True)
        assert message in str(e.value) and "\n" not in str(e.value)


def test_a_path_from_the_home_folder_is_expanded_for_every_script(tmp_path, monkeypatch):
    """--voc_root=~/VOCdevkit --download, as data/voc/prepare.py's docstring shows it: the download goes to
    the home folder, not to a folder named ~ in the working directory (no network: the download fails)."""
    import runpy
    import sys
    import urllib.request

    from conftest import ROOT

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert configure(DEFAULTS, ["--out_dir=~/runs/a"])["out_dir"] == str(tmp_path / "home" / "runs" / "a")
    assert configure(DEFAULTS, ["--out_dir=runs/~a"])["out_dir"] == "runs/~a"  # only a leading ~ is the home folder

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["prepare.py", "--voc_root=~/VOCdevkit", "--download", "--years=2007"])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(ROOT / "data" / "voc" / "prepare.py"), run_name="__main__")
    assert f"download it by hand into {tmp_path / 'home'}" in stop.value.code
    assert (tmp_path / "home").is_dir() and not (tmp_path / "~").exists()


@pytest.mark.parametrize("script, flag, some_keys", [
    ("train.py", "-h", ()),
    ("sample.py", "--help", ("ckpt", "json", "top_k", "threshold", "attention")),
    ("tools/eval.py", "--help", ("ckpt", "split", "max_dets", "layers")),
    ("tools/analyses.py", "--help", ("log", "weights", "matching", "slots", "num_slots", "ckpt", "split")),
    ("data/shapes/prepare.py", "--help", ("num_train", "min_objects", "max_objects", "seed")),
    ("data/voc/prepare.py", "-h", ("voc_root", "years", "splits", "download")),
    ("data/coco/prepare.py", "--help", ("ann", "images", "split")),
    ("data/yolo/prepare.py", "--help", ("yaml", "images", "labels", "names")),
])
def test_help_lists_every_key_with_its_default_and_comment_in_the_scripts_groups(script, flag, some_keys):
    import subprocess
    import sys

    from conftest import ROOT, load_script

    result = subprocess.run([sys.executable, script, "--out_dir=ignored", flag], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0 and not result.stderr, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0] == f"usage: python {script}{' [config.py ...]' if script == 'train.py' else ''} [--key=value ...]"
    listed = {line.split()[0].split("=")[0][2:]: line for line in lines if line.startswith("  --")}
    module = load_script(script)
    keys = module.CONFIG_KEYS if script == "train.py" else listed
    assert set(listed) == set(keys) and set(some_keys) <= set(listed) and "out_dir" in listed
    for key in keys:  # the default as typed, then the comment of the key's line
        flag, *comment = listed[key].split(maxsplit=1)
        default = getattr(module, key)
        assert configure({key: default}, [flag]) == {key: default} and flag.startswith(f"--{key}=") and comment
    if script == "train.py":  # under the comment that heads its group
        assert (lines.index("model") < lines.index(listed["backbone"]) < lines.index(listed["hidden_dim"])
                < lines.index("data"))
        assert lines.index("I/O") < lines.index(listed["out_dir"]) < lines.index("model")
