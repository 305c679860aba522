"""Shared test helpers: the repo root on sys.path, loading the data/*/prepare.py scripts as modules."""

import importlib.util
import os
import pathlib
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# torch's threads, fixed: a run on a CPU that looks busy would take fewer (processes.cpu_threads), and two
# runs that a test compares value for value must sum in the same order
os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))


def load_script(relative_path):
    """Import a script such as data/voc/prepare.py as a fresh module (its globals are its config)."""
    path = ROOT / relative_path
    spec = importlib.util.spec_from_file_location(path.parent.name + "_" + path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # so that worker processes can find its functions
    spec.loader.exec_module(module)
    return module
