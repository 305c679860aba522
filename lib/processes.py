"""
The processes of a training run: one per GPU under torchrun (DDP), the collectives that keep the ranks
in step when a run ends (README, "Long runs: how a run ends": promptly, with one line, on every rank, the
last checkpoint kept), the pre-emption signals, and the launcher's death. train.py's loop calls them.

    ddp, rank, world_size, device = setup_process(cfg)
    with stop_signals() as signals:   # a signal's name lands in signals: finish the step, save, stop
        ...
"""

import os
import signal
import sys
import threading
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist
from tqdm import tqdm

from data.pipeline import kill_data_workers

NONE_BAD = 2**62  # first_bad_iter when every loss so far was finite


def setup_process(cfg):
    """(ddp, rank, world_size, device): under torchrun one process per GPU (DDP), else one on cfg.device."""
    if "RANK" not in os.environ:
        return False, 0, 1, cfg.device
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    device = f"cuda:{int(os.environ['LOCAL_RANK'])}" if torch.cuda.is_available() else "cpu"
    if "cuda" in device:
        torch.cuda.set_device(device)
    exit_with_the_launcher(dist.get_rank())
    return True, dist.get_rank(), dist.get_world_size(), device


def cpu_threads():
    """torch's threads for a new run on the CPU: its default (one per core) while the cores are free, one per
    free core while other work keeps some busy, where a thread that waits for a descheduled one stalls
    every step (3x slower beside one busy process on 2 cores: EXPERIMENTS.md, "A CPU shared with another
    job"). OMP_NUM_THREADS, when set, decides."""
    threads = torch.get_num_threads()
    if "OMP_NUM_THREADS" in os.environ:
        return threads
    busy = busy_cores()
    if busy is None:  # not Linux: no /proc/stat to read
        return threads
    cores = len(os.sched_getaffinity(0))
    free = max(1, round(cores - busy))
    if free < threads:
        print(f"cpu: other work keeps {busy:.1f} of the {cores} cores busy: {free} thread"
              f"{'s' if free > 1 else ''} (OMP_NUM_THREADS=N chooses)")
    return min(threads, free)


def busy_cores(seconds=0.25):
    """How many cores the machine's other processes kept busy over a moment (Linux's /proc/stat; None elsewhere)."""
    def sample():
        with open("/proc/stat") as f:
            times = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        return sum(times), times[3] + times[4]

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError):
        return None
    cores = os.cpu_count() or 1  # /proc/stat's first line sums every core of the machine
    return cores * (1 - (idle1 - idle0) / max(1, total1 - total0))


def gather(obj, world_size):
    """[obj of every process], in rank order (a collective under DDP)."""
    if world_size == 1:
        return [obj]
    objs = [None] * world_size
    dist.all_gather_object(objs, obj)
    return objs


@contextmanager
def stop_signals():
    """Pre-emption: a list that SIGTERM, SIGUSR1 (a scheduler's warning) and a first SIGINT (Ctrl-C) add their
    name to; the loop then finishes its step (or leaves its evaluation for the resume), writes ckpt.pt and
    stops. A second SIGINT stops at once. The handlers before come back at the end, also after an error:
    left behind, they would swallow the signals of whatever runs next."""
    signals = []

    def note(number, frame):
        if number == signal.SIGINT and "SIGINT" in signals:
            raise KeyboardInterrupt
        signals.append(signal.Signals(number).name)

    previous = {n: signal.signal(n, note) for n in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        yield signals
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def exit_with_the_launcher(rank):
    """torchrun starts each rank in a session of its own: when torchrun itself is killed (SIGKILL, the OOM
    killer), nothing reaches the ranks, which would wait on its store forever, holding their GPU. A thread
    watches the parent: once it is gone, the rank and its data workers end within seconds."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        print(f"error: rank {rank}: its launcher (pid {parent}) is gone; stopping. "
              "The last checkpoint is left as it was",
              file=sys.stderr, flush=True)
        kill_data_workers()
        os._exit(1)

    threading.Thread(target=watch, name="launcher watchdog", daemon=True).start()


def on_master(write, ddp, master, device):
    """Run write() on the master alone; under DDP the other ranks learn whether it failed and stop with it,
    rather than wait for the master at their next collective. A failed write is the master's SystemExit (its
    one line); the other ranks exit 1."""
    failed = None
    if master:
        try:
            write()
        except SystemExit as error:
            failed = error
    if ddp:
        flag = torch.tensor(int(failed is not None), device=device)
        dist.broadcast(flag, 0)
        if flag.item() and not master:
            raise SystemExit(1)
    if failed is not None:
        raise failed


def stop_if_not_finite(first_bad_iter, ddp, master, ckpt_path):
    """Before anything is logged or saved: stop every rank, with one line from the master, when a loss went
    non-finite on any of them (a host sync, so at log and checkpoint points only)."""
    bad = first_bad_iter.clone()
    if ddp:
        dist.all_reduce(bad, op=dist.ReduceOp.MIN)
    if bad.item() != NONE_BAD:
        if master:
            tqdm.write(f"error: the loss is not finite at iteration {bad.item()}; stopping. "
                       f"The last good checkpoint ({ckpt_path}) is left as it was.")
        raise SystemExit(1)


def same_on_every_rank(model, ddp):
    """Under DDP, the master's weights and buffers on every rank, so that each evaluates what best.pt saves.
    A trained BatchNorm's running statistics (frozen_bn=False), and an EMA of them, differ between ranks:
    each rank updates them with its own batches (DDP sends the master's buffers only at each forward)."""
    for tensor in model.state_dict().values() if ddp else ():
        dist.broadcast(tensor, 0)


def out_of_memory(it, batch_shape, cfg, device, ckpt_path):
    """The exit for a training step that ran out of memory: one line with the batch and the keys that size it."""
    B, _, H, W = batch_shape
    return SystemExit(f"error: out of memory at iteration {it} on {device}, a batch of {B} images padded to {H}x{W}; "
                      f"lower batch_size={cfg.batch_size} (a larger gradient_accumulation_steps keeps the batch), "
                      f"max_size={cfg.max_size} or train_scales (up to {max(cfg.train_scales)}; "
                      f"val_scale={cfg.val_scale} "
                      f"at evaluation). {ckpt_path} is left as it was")
