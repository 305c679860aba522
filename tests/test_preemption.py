"""Long runs in the real world: SIGTERM saves and stops, checkpoints on a clock, a write that fails is
one error line and keeps the last checkpoint, an out_dir that cannot be written stops before training."""

import errno
import os
import signal
import subprocess
import sys

import pytest
import torch

import train
from conftest import ROOT
from test_train import TINY, make_shapes, run, run_ddp


def test_sigterm_finishes_the_step_saves_and_the_resume_is_exact(tmp_path):
    make_shapes(tmp_path / "data", 10, 2)
    flags = [f"--{k}={v}" for k, v in {**TINY, "dataset": tmp_path / "data", "out_dir": tmp_path / "split",
                                        "max_iters": 1000, "device": "cpu", "dtype": "float32"}.items()]
    child = subprocess.Popen([sys.executable, "train.py", *flags], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    for line in child.stdout:  # a few steps in, as a scheduler's warning would come
        if line.startswith("iter 3:"):
            child.send_signal(signal.SIGTERM)
            break
    out = child.stdout.read()
    assert child.wait(timeout=120) == 0
    stopped = torch.load(tmp_path / "split" / "ckpt.pt", weights_only=False)["iter_num"]
    assert f"SIGTERM: stopped at iteration {stopped};" in out and 3 <= stopped < 1000
    assert not (tmp_path / "split" / "best.pt").exists()  # no evaluation, no best
    run(tmp_path / "split", tmp_path / "data", max_iters=stopped + 2, init_from="resume")
    run(tmp_path / "straight", tmp_path / "data", max_iters=stopped + 2)
    a = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=False)
    b = torch.load(tmp_path / "split" / "ckpt.pt", weights_only=False)
    assert a["iter_num"] == b["iter_num"] == stopped + 2
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_sigusr1_to_the_whole_job_spares_the_data_workers(tmp_path):
    """A scheduler may signal every process of the job (SLURM's --signal), data workers included."""
    make_shapes(tmp_path / "data", 10, 2)
    flags = [f"--{k}={v}" for k, v in {**TINY, "dataset": tmp_path / "data", "out_dir": tmp_path / "out",
                                        "num_workers": 2, "max_iters": 1000, "device": "cpu"}.items()]
    child = subprocess.Popen([sys.executable, "train.py", *flags], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    for line in child.stdout:
        if line.startswith("iter 3:"):
            os.killpg(child.pid, signal.SIGUSR1)  # the main process and both workers
            break
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err[-2000:]
    stopped = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=False)["iter_num"]
    assert f"SIGUSR1: stopped at iteration {stopped};" in out and "Traceback" not in err


def test_checkpoint_minutes_writes_ckpt_without_evaluating(tmp_path, monkeypatch):
    make_shapes(tmp_path / "data", 4, 2)
    writes = []
    real_save = train.save_checkpoint
    monkeypatch.setattr(train, "save_checkpoint", lambda ckpt, path: writes.append((path.rsplit("/", 1)[1], ckpt["iter_num"]))
                        or real_save(ckpt, path))
    run(tmp_path / "out", tmp_path / "data", max_iters=3, checkpoint_minutes=1e-9)
    assert writes == [("ckpt.pt", 1), ("ckpt.pt", 2), ("ckpt.pt", 3), ("best.pt", 3)]  # best.pt only at the evaluation


def test_a_failed_write_is_one_error_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    make_shapes(tmp_path / "data", 4, 2)
    run(tmp_path / "out", tmp_path / "data", max_iters=2)

    def disk_full(obj, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half a checkpo")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(SystemExit) as stop:
        run(tmp_path / "out", tmp_path / "data", max_iters=4, init_from="resume")
    monkeypatch.undo()
    message = stop.value.code
    assert message.startswith("error: could not write ") and "No space left on device" in message
    assert "GiB are free there" in message and "\n" not in message
    assert not (tmp_path / "out" / "ckpt.pt.tmp").exists()
    assert torch.load(tmp_path / "out" / "ckpt.pt", weights_only=False)["iter_num"] == 2


def test_a_data_worker_dying_during_a_write_is_not_called_a_full_disk(tmp_path, monkeypatch):
    """torch reports a killed data worker from its SIGCHLD handler, wherever the main process is: also
    inside torch.save. That is re-raised as it is, with the temporary file removed."""
    (tmp_path / "ckpt.pt").write_bytes(b"the last checkpoint")

    def worker_killed(obj, path, *args, **kwargs):
        open(path, "wb").close()
        raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Terminated. ")

    monkeypatch.setattr(torch, "save", worker_killed)
    with pytest.raises(RuntimeError, match="DataLoader worker"):
        train.save_checkpoint({"model": {}}, str(tmp_path / "ckpt.pt"))
    assert not (tmp_path / "ckpt.pt.tmp").exists() and (tmp_path / "ckpt.pt").read_bytes() == b"the last checkpoint"


def test_an_out_dir_that_cannot_be_written_stops_before_training(tmp_path, monkeypatch):
    make_shapes(tmp_path / "data", 4, 2)
    (tmp_path / "a_file").write_text("")
    steps = []
    monkeypatch.setattr(train, "lr_factor", lambda it, cfg: steps.append(it) or 1.0)
    with pytest.raises(SystemExit) as stop:
        run(tmp_path / "a_file" / "out", tmp_path / "data", max_iters=2)
    assert stop.value.code.startswith("error: out_dir=") and "is not writable" in stop.value.code and steps == []


DDP_SIGNAL_SCRIPT = """
import os, signal, sys, torch
sys.path.insert(0, {root!r})
import train
if os.environ["RANK"] == "1":  # only the second rank is signalled, during iteration 3
    real_lr_factor = train.lr_factor
    def lr_factor(it, cfg):
        if it == 3:
            os.kill(os.getpid(), signal.SIGUSR1)
        return real_lr_factor(it, cfg)
    train.lr_factor = lr_factor
config = train.get_config([])
config.update({config!r})
model, _ = train.train(config)
torch.save(model.state_dict(), {out!r} + "/weights_" + os.environ["RANK"] + ".pt")
"""


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    make_shapes(tmp_path / "data", 8, 4)
    config = dict(TINY, dataset=str(tmp_path / "data"), out_dir=str(tmp_path / "out"), max_iters=1000)
    result = run_ddp(DDP_SIGNAL_SCRIPT, tmp_path, config)
    assert "a signal on another rank: stopped at iteration 4;" in result.stdout
    a, b = (torch.load(tmp_path / f"weights_{r}.pt") for r in (0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.load(tmp_path / "out" / "ckpt.pt", weights_only=False)["iter_num"] == 4
