"""
The one flag parser of every script here (nanoGPT's configurator, as a function). A script's
defaults are plain globals at its top; its command line overrides them, in order:

    python train.py config/voc.py --batch_size=8 --compile=False
    python sample.py --ckpt=out-shapes/ckpt.pt --attention

- a config file (train.py only) is plain Python; each of its assignments to a default's name
  overrides that default;
- --key=value sets one default; the value is read as a Python literal (--crop_size=(384, 600),
  --compile=False), and as the plain text where the default is a string (--out_dir=2024); a bare
  --key means True for a True/False default.

Every value must then have its default's type (an integer where a number is expected is fine). A
bad file, an unknown key or a wrong type stops the script with one `error:` line. A string that
starts with ~ is a path from the home folder (--voc_root=~/VOCdevkit), expanded here for every script.
--help (or -h) prints the script's keys, each with its default and its comment, and exits.
"""

import ast
import difflib
import io
import os
import sys
import tokenize

VALUE_TYPES = (bool, int, float, str, list, tuple)


def configure(defaults, argv, config_files=False, given=None):
    """defaults ({name: value}) overridden by argv; returns a new dict. given: a set that receives the
    names that a config file or a flag set."""
    config, given = dict(defaults), set() if given is None else given
    if "--help" in argv or "-h" in argv:
        print(help_text(defaults, sys.argv[0], config_files))
        raise SystemExit(0)
    for arg in argv:
        if not arg.startswith("--"):
            if not config_files:
                raise SystemExit(f"error: unexpected argument {arg!r} (flags are --key=value)")
            overrides = read_config_file(arg, config)
            config.update(overrides)
            given.update(overrides)
            continue
        key, equals, value = arg[2:].partition("=")
        if key not in config:
            known = (", ".join(f"--{k}" for k in config) if len(config) <= 25
                     else "the defaults at the top of the script")
            raise SystemExit(f"error: unknown flag --{key}{did_you_mean(key, config, '--')} (known: {known})")
        given.add(key)
        if not equals and isinstance(config[key], bool):  # a bare --attention means True
            value = "True"
        if not isinstance(defaults[key], str):
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                pass  # left as text: the type check below names what it should be
        config[key] = value
    for key, value in config.items():
        default = defaults[key]
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            config[key] = value = float(value)
        if isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
            config[key] = value = type(default)(value)
        if type(value) is not type(default):
            kind = {bool: "True or False", int: "an integer", float: "a number",
                    str: "a string"}.get(type(default), "a list")
            raise SystemExit(f"error: {key}={value!r} should be {kind}")
        if isinstance(value, str) and value.startswith("~"):  # a path from the home folder, as a shell would expand it
            config[key] = os.path.expanduser(value)
    return config


def help_text(defaults, script, config_files=False):
    """--help: the first paragraph of the script's docstring, then every key as --key=default and the
    comment on its line, under the comment lines that head its group in the script (read from its source)."""
    try:
        source = open(script).read()
        tree = ast.parse(source)
    except (OSError, SyntaxError, ValueError):
        source, tree = "", ast.parse("")
    lines = source.splitlines()
    trailing = {}  # line number -> the comment at its end
    for token in tokenize.generate_tokens(io.StringIO(source).readline) if source else ():
        if token.type == tokenize.COMMENT and lines[token.start[0] - 1][: token.start[1]].strip():
            trailing[token.start[0]] = token.string.lstrip("# ")
    where = {}  # key -> the line that sets it
    for node in tree.body:
        if isinstance(node, ast.Assign):
            for target in node.targets:
                for name in target.elts if isinstance(target, ast.Tuple) else [target]:
                    if isinstance(name, ast.Name) and name.id in defaults and name.id not in where:
                        where[name.id] = node.lineno
    doc = (ast.get_docstring(tree) or "").strip().split("\n\n")[0]
    usage = f"python {script}{' [config.py ...]' if config_files else ''} [--key=value ...]"
    out = [f"usage: {usage}", *([doc] if doc else [])]
    width = min(40, max(len(f"--{k}={shown(v)}") for k, v in defaults.items()) + 2) if defaults else 0
    for key in sorted(defaults, key=lambda k: where.get(k, len(lines) + 1)):
        line = where.get(key)
        heading = []  # the comment lines just above the key, with no blank line between
        while line and line - len(heading) > 1 and lines[line - len(heading) - 2].lstrip().startswith("#"):
            heading.insert(0, lines[line - len(heading) - 2].strip().lstrip("# "))
        heading = [h for h in heading if h.strip("-")]
        if heading or len(out) <= 2:
            out += ["", *heading]
        flag = f"--{key}={shown(defaults[key])}"
        out.append(f"  {flag:<{width}} {trailing.get(line, '')}".rstrip())
    return "\n".join(out)


def shown(value):
    """A default as it would be typed after --key= (a list without spaces, so that a shell keeps it one word)."""
    if isinstance(value, str):
        return value
    return repr(value).replace(", ", ",") if isinstance(value, (list, tuple)) else repr(value)


def read_config_file(path, config):
    """The defaults that a config file sets, as {name: value}."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: no config file {path}")
    namespace = {}
    try:
        exec(open(path).read(), namespace)
    except Exception as e:  # a config file is user code: its mistake is one line, not a traceback
        raise SystemExit(f"error: config file {path} fails: {type(e).__name__}: {e}")
    overrides = {}
    for key, value in namespace.items():
        if key in config:
            overrides[key] = value
        elif not key.startswith("_") and isinstance(value, VALUE_TYPES):
            raise SystemExit(f"error: {path} sets '{key}', which is not a config key{did_you_mean(key, config)}")
    return overrides


def did_you_mean(key, names, prefix=""):
    """'; did you mean NAME?' for the name closest to a mistyped key (--batchsize: --batch_size), else ''."""
    close = difflib.get_close_matches(key, list(names), n=1, cutoff=0.6)
    return f"; did you mean {prefix}{close[0]}?" if close else ""


def device_problem(device):
    """Why a --device value cannot run here (None if it can): cpu, or cuda[:N] on a machine with a GPU."""
    import torch  # only when asked: the parser itself needs no torch

    if device == "cpu" or (device.startswith("cuda") and torch.cuda.is_available()):
        return None
    return f"--device={device} must be cpu, or cuda on a machine with a GPU"
