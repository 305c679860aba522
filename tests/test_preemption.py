"""Long runs in the real world: SIGTERM saves and stops, checkpoints on a clock, a write that fails is
one error line and keeps the last checkpoint, an out_dir that cannot be written stops before training."""

import errno
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import lib.run
import train
from conftest import ROOT
from detr import DETR
from test_train import TINY, make_shapes, run, run_ddp


def wait_for_step(child):
    """Read a training process's stdout up to its log line of step 3: a few steps into the run."""
    for line in child.stdout:
        if line.startswith("iter 3:"):
            return


def test_sigterm_finishes_the_step_saves_and_the_resume_is_exact(tmp_path):
    make_shapes(tmp_path / "data", 10, 2)
    flags = [f"--{k}={v}" for k, v in {**TINY, "dataset": tmp_path / "data", "out_dir": tmp_path / "split",
                                        "max_iters": 1000, "device": "cpu", "dtype": "float32"}.items()]
    child = subprocess.Popen([sys.executable, "train.py", *flags], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    wait_for_step(child)  # a few steps in, as a scheduler's warning would come
    child.send_signal(signal.SIGTERM)
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


def no_process_left(group, seconds=15):
    """Whether every process of a process group has exited within seconds (the data workers included)."""
    for _ in range(seconds * 10):
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 0), (signal.SIGUSR1, 0), (signal.SIGINT, 130)])
def test_a_signal_to_the_whole_job_saves_and_the_resume_is_exact(tmp_path, sig, status):
    """scancel and a time limit signal every process of the job (SIGTERM), SLURM's --signal may too
    (SIGUSR1), and a terminal's Ctrl-C reaches its whole process group (SIGINT): the data workers leave it
    to the main process, which finishes the step, saves and exits (0; 130 for Ctrl-C, the shell's status
    for an interrupted command, so that `train.py && ...` stops), no traceback, no worker left behind;
    the resume then ends bit for bit where a straight run does."""
    make_shapes(tmp_path / "data", 10, 2)
    flags = [f"--{k}={v}" for k, v in {**TINY, "dataset": tmp_path / "data", "out_dir": tmp_path / "split",
                                        "num_workers": 2, "max_iters": 1000, "device": "cpu"}.items()]
    child = subprocess.Popen([sys.executable, "train.py", *flags], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for_step(child)
    os.killpg(child.pid, sig)  # the main process and both workers
    out, err = child.communicate(timeout=60)
    assert child.returncode == status, err[-2000:]
    assert no_process_left(child.pid)
    stopped = torch.load(tmp_path / "split" / "ckpt.pt", weights_only=False)["iter_num"]
    assert f"{sig.name}: stopped at iteration {stopped};" in out and "Traceback" not in err
    run(tmp_path / "split", tmp_path / "data", max_iters=stopped + 2, init_from="resume")
    run(tmp_path / "straight", tmp_path / "data", max_iters=stopped + 2)
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=False)["model"] for d in ("straight", "split"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def traceback_frames_of_the_run(stderr):
    """The traceback lines of train.py's own processes (a rank's lines come prefixed with [rankN]:, torchrun's not)."""
    return [line for line in stderr.splitlines() if 'File "' in line and ("train.py" in line or "ddp.py" in line)]


def torchrun(flags, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "train.py", *flags], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, **kwargs)


def test_sigterm_to_every_process_under_torchrun_saves_and_the_resume_is_exact(tmp_path):
    """scancel under torchrun: torchrun, both ranks and their data workers get SIGTERM. The ranks finish
    the step, agree on it, save and exit 0 with no traceback of theirs; torchrun then reports its own
    signal (exit 1). The resumed run ends bit for bit where a straight one does."""
    make_shapes(tmp_path / "data", 10, 2)
    config = {**TINY, "dataset": tmp_path / "data", "num_workers": 2, "device": "cpu"}
    flags = lambda out, **more: [f"--{k}={v}" for k, v in {**config, "out_dir": tmp_path / out, **more}.items()]
    child = torchrun(flags("split", max_iters=1000))
    wait_for_step(child)
    os.killpg(child.pid, signal.SIGTERM)
    out, err = child.communicate(timeout=120)
    assert no_process_left(child.pid)
    stopped = torch.load(tmp_path / "split" / "ckpt.pt", weights_only=False)["iter_num"]
    assert f"SIGTERM: stopped at iteration {stopped};" in out and 3 <= stopped < 1000
    assert traceback_frames_of_the_run(err) == []  # torchrun's own SignalException report only
    for args in (flags("split", max_iters=stopped + 2, init_from="resume"), flags("straight", max_iters=stopped + 2)):
        result = torchrun(args)
        assert result.wait(timeout=300) == 0, result.stderr.read()[-2000:]
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=False)["model"] for d in ("straight", "split"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_minutes_writes_ckpt_without_evaluating(tmp_path, monkeypatch):
    make_shapes(tmp_path / "data", 4, 2)
    writes = []
    real_save = lib.run.write_checkpoint
    monkeypatch.setattr(lib.run, "write_checkpoint",
                        lambda ckpt, path: writes.append((path.rsplit("/", 1)[1], ckpt["iter_num"]))
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


DDP_FULL_DISK_SCRIPT = """
import errno, os, sys, torch
sys.path.insert(0, {root!r})
import train
if os.environ["RANK"] == "0":  # the master's disk fills up after its first checkpoint
    real_save, saves = torch.save, []
    def save(obj, path, *args, **kwargs):
        if str(path).endswith("ckpt.pt.tmp"):
            saves.append(path)
        if len(saves) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, path, *args, **kwargs)
    torch.save = save
config = train.get_config([])
config.update({config!r})
train.train(config)
"""


def a_failing_torchrun(tmp_path, script_text):
    """Two ranks under torchrun running script_text: the run must fail, and every process be gone within
    60 s (torchrun's collectives would wait 10 minutes for a rank that died)."""
    script = tmp_path / "ddp.py"
    script.write_text(script_text)
    start = time.time()
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script)], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0 and time.time() - start < 60
    return result


def test_a_failed_write_under_torchrun_stops_every_rank_with_one_line(tmp_path):
    """The master's write fails: every rank stops within seconds (not at torchrun's 10-minute collective
    timeout), none prints a traceback, the master's one error line says why, and the last checkpoint is
    left as it was."""
    make_shapes(tmp_path / "data", 8, 2)
    config = dict(TINY, dataset=str(tmp_path / "data"), out_dir=str(tmp_path / "out"), max_iters=1000,
                  checkpoint_minutes=1e-9)  # a checkpoint after every step
    result = a_failing_torchrun(tmp_path, DDP_FULL_DISK_SCRIPT.format(root=str(ROOT), config=config))
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: could not write ") and "No space left" in errors[0]
    assert traceback_frames_of_the_run(result.stderr) == []  # only torchrun's own ChildFailedError report
    assert torch.load(tmp_path / "out" / "ckpt.pt", weights_only=False)["iter_num"] == 1


def test_out_of_memory_in_a_step_is_one_line_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    make_shapes(tmp_path / "data", 4, 2)
    run(tmp_path / "out", tmp_path / "data", max_iters=2)

    def out_of_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(DETR, "forward", out_of_memory)
    with pytest.raises(SystemExit) as stop:
        run(tmp_path / "out", tmp_path / "data", max_iters=4, init_from="resume")
    message = stop.value.code
    assert (message.startswith("error: out of memory at iteration 2 on cpu, a batch of 2 images padded to ")
            and "\n" not in message)
    assert all(key in message for key in ("batch_size=2", "gradient_accumulation_steps", "max_size=96",
                                          "train_scales (up to 64", "val_scale=64"))
    assert torch.load(tmp_path / "out" / "ckpt.pt", weights_only=False)["iter_num"] == 2


DDP_OUT_OF_MEMORY_SCRIPT = """
import os, runpy, sys, torch
sys.path.insert(0, {root!r})
from detr import DETR
if os.environ["RANK"] == "1":  # the second rank runs out of memory in its third training step
    real_forward, calls = DETR.forward, []
    def forward(self, *args, **kwargs):
        calls.append(self.training)
        if sum(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_forward(self, *args, **kwargs)
    DETR.forward = forward
sys.argv = ["train.py", *{flags!r}]
runpy.run_path({root!r} + "/train.py", run_name="__main__")  # train.py as torchrun would run it
"""


def test_out_of_memory_on_one_rank_under_torchrun_stops_every_rank(tmp_path):
    make_shapes(tmp_path / "data", 8, 2)
    flags = [f"--{k}={v}" for k, v in {**TINY, "dataset": tmp_path / "data", "out_dir": tmp_path / "out",
                                        "max_iters": 1000, "device": "cpu"}.items()]
    result = a_failing_torchrun(tmp_path, DDP_OUT_OF_MEMORY_SCRIPT.format(root=str(ROOT), flags=flags))
    errors = [line for line in result.stderr.splitlines() if "error: " in line]
    # rank 1's, maybe rank 0's
    assert "error: out of memory at iteration 2 on cpu" in errors[0] and len(errors) <= 2, errors
    assert traceback_frames_of_the_run(result.stderr) == []


def test_a_data_worker_dying_during_a_write_is_not_called_a_full_disk(tmp_path, monkeypatch):
    """torch reports a killed data worker from its SIGCHLD handler, wherever the main process is: also
    inside torch.save. That is re-raised as it is, with the temporary file removed."""
    (tmp_path / "ckpt.pt").write_bytes(b"the last checkpoint")

    def worker_killed(obj, path, *args, **kwargs):
        open(path, "wb").close()
        raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Terminated. ")

    monkeypatch.setattr(torch, "save", worker_killed)
    with pytest.raises(RuntimeError, match="DataLoader worker"):
        lib.run.write_checkpoint({"model": {}}, str(tmp_path / "ckpt.pt"))
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
