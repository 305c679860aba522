"""Every way a run ends (README, "How a run ends"), with real processes where it matters: a crash ends the
process whatever num_workers is, Ctrl-C saves, a new run never overwrites a finished one, a dead launcher
takes its ranks with it, every rank evaluates the model best.pt saves, a resume takes a new learning rate,
and under torchrun a failed log append or a non-finite loss on one rank stops every rank with one line."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from lib import inference
from lib import processes
import train
from lib import weights
from conftest import ROOT
from detr import DETR
from test_preemption import a_failing_torchrun, no_process_left, torchrun, traceback_frames_of_the_run, wait_for_step
from test_train import TINY, make_shapes, run, run_ddp

RAISING_SCRIPT = """
import runpy, sys
sys.path.insert(0, {root!r})
from detr import DETR
real_forward, calls = DETR.forward, []
def forward(self, *args, **kwargs):  # a bug in the third training step, or in the first evaluation
    calls.append(self.training)
    if {where!r} == "evaluation" and not self.training or {where!r} == "step" and sum(calls) == 3:
        raise RuntimeError("a bug")
    return real_forward(self, *args, **kwargs)
DETR.forward = forward
sys.argv = ["train.py", *{flags!r}]
runpy.run_path({root!r} + "/train.py", run_name="__main__")
"""


def tiny_flags(tmp_path, **more):
    return [f"--{k}={v}" for k, v in {**TINY, "dataset": tmp_path / "data", "out_dir": tmp_path / "out",
                                       "device": "cpu", **more}.items()]


@pytest.mark.parametrize("where", ["step", "evaluation"])
def test_an_exception_with_data_workers_ends_the_process(tmp_path, where):
    """The data workers ignore SIGTERM (pre-emption); an exception's traceback keeps their loader alive, so
    multiprocessing's exit handler waited on them forever. Now the process ends within seconds, with the
    traceback and status 1, and no worker is left."""
    make_shapes(tmp_path / "data", 8, 4)
    script = tmp_path / "raising.py"
    script.write_text(RAISING_SCRIPT.format(root=str(ROOT), where=where, flags=tiny_flags(
        tmp_path, num_workers=2, max_iters=1000, eval_interval=2)))
    child = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    try:
        out, err = child.communicate(timeout=90)
    finally:
        os.killpg(child.pid, signal.SIGKILL) if not no_process_left(child.pid, 1) else None
    assert child.returncode == 1 and "RuntimeError: a bug" in err and "Traceback" in err
    assert no_process_left(child.pid)


def test_a_second_ctrl_c_stops_at_once():
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with processes.stop_signals() as signals:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
            assert signals == ["SIGINT"]  # the first: noted, the step goes on
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is before


def test_a_new_run_never_overwrites_a_finished_one(tmp_path, capsys):
    make_shapes(tmp_path / "data", 4, 2)
    run(tmp_path / "out", tmp_path / "data", max_iters=3)
    best = (tmp_path / "out" / "best.pt").read_bytes()
    with pytest.raises(SystemExit) as stop:
        run(tmp_path / "out", tmp_path / "data", max_iters=1)
    message = stop.value.code
    assert message.startswith("error: out_dir=") and "ckpt.pt, best.pt, log.jsonl" in message and "\n" not in message
    assert all(choice in message for choice in ("--init_from=resume", "another --out_dir", "--overwrite"))
    assert (tmp_path / "out" / "best.pt").read_bytes() == best
    with pytest.raises(SystemExit, match="is in out_dir=.*give another --out_dir"):  # --overwrite would delete it
        run(tmp_path / "out", tmp_path / "data", max_iters=1, overwrite=True,
            init_from=str(tmp_path / "out" / "best.pt"))
    assert (tmp_path / "out" / "best.pt").read_bytes() == best
    run(tmp_path / "out", tmp_path / "data", max_iters=2, overwrite=True)  # starting over: one run in the log
    log = [json.loads(line) for line in open(tmp_path / "out" / "log.jsonl")]
    assert ([r["iter"] for r in log] == [1, 2, 2]
            and torch.load(tmp_path / "out" / "best.pt", weights_only=False)["iter_num"] == 2)


def test_a_resume_cuts_the_log_back_to_its_checkpoint(tmp_path):
    """A run killed after logging past its last checkpoint: the resume trains those steps again, and
    log.jsonl holds them once, in order."""
    make_shapes(tmp_path / "data", 4, 2)
    run(tmp_path / "out", tmp_path / "data", max_iters=2)
    with open(tmp_path / "out" / "log.jsonl", "a") as f:
        f.write(json.dumps({"iter": 3, "loss": 1.0}) + "\n")
    run(tmp_path / "out", tmp_path / "data", max_iters=4, init_from="resume")
    log = [json.loads(line) for line in open(tmp_path / "out" / "log.jsonl")]
    losses = [r for r in log if "loss" in r]
    assert [r["iter"] for r in losses] == [1, 2, 3, 4] and losses[2]["loss"] != 1.0


def test_a_resume_trains_at_a_new_learning_rate_and_says_so(tmp_path, capsys):
    make_shapes(tmp_path / "data", 4, 2)
    run(tmp_path / "out", tmp_path / "data", max_iters=2)  # TINY: learning_rate 1e-3, lr_backbone 1e-4
    capsys.readouterr()
    run(tmp_path / "out", tmp_path / "data", max_iters=3, init_from="resume", learning_rate=5e-4)
    out = capsys.readouterr().out
    assert "init_from=resume: " in out and " at iteration 2, " in out and "learning_rate 0.001 -> 0.0005" in out
    assert "lr_backbone" not in out
    log = [json.loads(line) for line in open(tmp_path / "out" / "log.jsonl")]
    assert [r["lr"] for r in log if "loss" in r] == pytest.approx([5e-4, 1e-3, 5e-4])


def test_a_signal_during_an_evaluation_stops_it_and_the_resume_evaluates_first(tmp_path, monkeypatch):
    """A long evaluation (VOC's takes minutes) would outlast torchrun's and SLURM's grace before SIGKILL: a
    signal stops it at the next batch, ckpt.pt is written at the step, and the resume evaluates first."""
    make_shapes(tmp_path / "data", 4, 6)
    real_forward = DETR.forward

    def forward(self, *args, **kwargs):
        if not self.training:
            os.kill(os.getpid(), signal.SIGTERM)  # during the first evaluation's first batch
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(DETR, "forward", forward)
    run(tmp_path / "out", tmp_path / "data", max_iters=4, eval_interval=2)
    monkeypatch.undo()
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=False)
    assert ckpt["iter_num"] == 2 and ckpt["evaluation_due"] and not (tmp_path / "out" / "best.pt").exists()
    run(tmp_path / "out", tmp_path / "data", max_iters=4, eval_interval=2, init_from="resume")
    log = [json.loads(line) for line in open(tmp_path / "out" / "log.jsonl")]
    assert [r["iter"] for r in log if "val_mAP" in r] == [2, 4]


def test_out_of_memory_in_an_evaluation_names_its_batch(tmp_path, monkeypatch):
    make_shapes(tmp_path / "data", 4, 3)
    real_forward = DETR.forward

    def forward(self, *args, **kwargs):
        if not self.training:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(DETR, "forward", forward)
    with pytest.raises(SystemExit) as stop:
        run(tmp_path / "out", tmp_path / "data", max_iters=2)
    assert stop.value.code.startswith("error: out of memory evaluating a batch of 2 images padded to 64x64 on cpu; ")
    assert "batch_size=2" in stop.value.code and "val_scale" in stop.value.code


DDP_EVALUATION_SCRIPT = """
import os, sys, torch
sys.path.insert(0, {root!r})
import train
from lib import inference
real_predict = inference.predict
def predict(*args, **kwargs):  # each rank's detections of its shard
    predictions = real_predict(*args, **kwargs)
    torch.save(predictions, {out!r} + "/predictions_" + os.environ["RANK"] + ".pt")
    return predictions
inference.predict = predict  # what train.py's evaluation (inference.evaluate) calls
config = train.get_config([])
config.update({config!r})
train.train(config)
"""


def test_every_rank_evaluates_the_ema_that_best_pt_saves(tmp_path):
    """With a trained BatchNorm, each rank's running statistics (and their EMA) follow its own batches:
    every rank evaluated its own model. Now each rank's detections are exactly those of best.pt's model."""
    make_shapes(tmp_path / "data", 8, 5)  # 5 val images: rank 0 evaluates batches 0 and 2, rank 1 batch 1
    config = dict(TINY, dataset=str(tmp_path / "data"), out_dir=str(tmp_path / "out"), max_iters=3, ema_decay=0.9,
                  ema_warmup_iters=1, frozen_bn=False, trainable_layers=5)
    run_ddp(DDP_EVALUATION_SCRIPT, tmp_path, config)
    model = weights.load_model(str(tmp_path / "out" / "best.pt"))[0]
    cfg = train.SimpleNamespace(**{**train.get_config([]), **config})
    _, val_set = train.load_datasets(cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks ran (OMP_NUM_THREADS=1): the same sums in the same order
    try:
        alone = inference.predict(model, val_set, "cpu", cfg.batch_size, 0)
        mAP = inference.evaluate(model, val_set, cfg, "cpu")["mAP"]
    finally:
        torch.set_num_threads(threads)
    for rank, images in ((0, [0, 1, 4]), (1, [2, 3])):
        shard = torch.load(tmp_path / f"predictions_{rank}.pt")
        assert sorted(shard) == images
        for i in images:
            assert all(torch.equal(shard[i][k], alone[i][k]) for k in alone[i]), (rank, i)
    logged = [json.loads(line) for line in open(tmp_path / "out" / "log.jsonl")][-1]
    assert logged["val_mAP"] == mAP


DDP_FAILING_LOG_SCRIPT = """
import builtins, errno, os, sys
sys.path.insert(0, {root!r})
import train
if os.environ["RANK"] == "0":  # the master's disk fills up at its third log line
    real_open, appends = builtins.open, []
    def full_open(path, mode="r", *args, **kwargs):
        if str(path).endswith("log.jsonl") and mode == "a":
            appends.append(path)
            if len(appends) == 3:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *args, **kwargs)
    builtins.open = full_open
config = train.get_config([])
config.update({config!r})
train.train(config)
"""


def test_a_failed_log_append_under_torchrun_stops_every_rank_with_one_line(tmp_path):
    make_shapes(tmp_path / "data", 8, 2)
    config = dict(TINY, dataset=str(tmp_path / "data"), out_dir=str(tmp_path / "out"), max_iters=1000)
    result = a_failing_torchrun(tmp_path, DDP_FAILING_LOG_SCRIPT.format(root=str(ROOT), config=config))
    errors = [line for line in result.stderr.splitlines() if "error: " in line]
    assert len(errors) == 1 and "error: could not append to " in errors[0] and "No space left" in errors[0], errors
    assert traceback_frames_of_the_run(result.stderr) == []


DDP_NOT_FINITE_SCRIPT = """
import os, sys
sys.path.insert(0, {root!r})
import train
if os.environ["RANK"] == "1":  # the second rank's loss goes non-finite at iteration 3
    real_forward, calls = train.SetCriterion.forward, []
    def forward(self, *args, **kwargs):
        losses = real_forward(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 4:
            losses["loss"] = losses["loss"] * float("nan")
        return losses
    train.SetCriterion.forward = forward
config = train.get_config([])
config.update({config!r})
train.train(config)
"""


def test_a_non_finite_loss_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    make_shapes(tmp_path / "data", 8, 2)
    config = dict(TINY, dataset=str(tmp_path / "data"), out_dir=str(tmp_path / "out"), max_iters=1000, log_interval=5)
    result = a_failing_torchrun(tmp_path, DDP_NOT_FINITE_SCRIPT.format(root=str(ROOT), config=config))
    assert result.stdout.count("error: the loss is not finite at iteration 3;") == 1, result.stdout[-2000:]
    assert "iter 5:" not in result.stdout and traceback_frames_of_the_run(result.stderr) == []


def children(pid):
    """The pids whose parent is pid (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                if entry.isdigit() and int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
        except (OSError, IndexError, ValueError):
            pass
    return found


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads the process tree from /proc")
def test_the_ranks_and_their_workers_end_when_torchrun_is_killed(tmp_path):
    """torchrun starts each rank in a session of its own: SIGKILL to torchrun (the OOM killer, kill -9)
    reached no rank, and they waited on its store for ever. Now every rank and data worker ends within seconds."""
    make_shapes(tmp_path / "data", 10, 2)
    child = torchrun(tiny_flags(tmp_path, num_workers=2, max_iters=100000))
    wait_for_step(child)
    ranks = [pid for pid in children(child.pid) if alive(pid)]
    workers = [pid for rank in ranks for pid in children(rank)]
    assert len(ranks) == 2 and len(workers) == 4
    child.kill()
    child.wait()
    deadline = time.time() + 20
    while time.time() < deadline and any(alive(pid) for pid in ranks + workers):
        time.sleep(0.2)
    left = [pid for pid in ranks + workers if alive(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert left == []
    assert "its launcher (pid " in child.stderr.read()


def test_sigkill_keeps_the_last_checkpoint_and_the_workers_end(tmp_path):
    """Nothing can be done at a SIGKILL: the data workers notice their main process is gone and exit (torch's
    watchdog), and ckpt.pt (written atomically) is whole and resumes."""
    make_shapes(tmp_path / "data", 10, 2)
    child = subprocess.Popen([sys.executable, "train.py", *tiny_flags(tmp_path, num_workers=2, max_iters=1000,
                                                                      checkpoint_minutes=1e-9)],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                             start_new_session=True)
    wait_for_step(child)
    workers = children(child.pid)
    child.kill()
    assert child.wait(timeout=10) == -signal.SIGKILL and len(workers) == 2
    assert no_process_left(child.pid, seconds=20)
    stopped = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=False)["iter_num"]
    run(tmp_path / "out", tmp_path / "data", max_iters=stopped + 1, init_from="resume")


def test_a_dead_rank_ends_the_run_and_keeps_the_last_checkpoint(tmp_path):
    """One rank SIGKILLed (its own OOM kill): torchrun ends the others, which stop within seconds with one
    line each rather than wait in a collective, and ckpt.pt is the last one written."""
    make_shapes(tmp_path / "data", 10, 2)
    child = torchrun(tiny_flags(tmp_path, num_workers=2, max_iters=100000, checkpoint_minutes=1e-9))
    wait_for_step(child)
    ranks = sorted(pid for pid in children(child.pid) if alive(pid))
    start = time.time()
    os.kill(ranks[1], signal.SIGKILL)
    out, err = child.communicate(timeout=60)
    assert child.returncode != 0 and time.time() - start < 30
    assert "error: rank 0 stopped: another rank of the run did" in err and traceback_frames_of_the_run(err) == []
    assert no_process_left(child.pid) and not any(alive(pid) for pid in ranks)
    assert torch.load(tmp_path / "out" / "ckpt.pt", weights_only=False)["iter_num"] >= 2  # written after "iter 2:"
