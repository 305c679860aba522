"""
A training run around its steps: what train.py's loop calls, each in one line. The Run holds the run's
state (its iteration, best value, the losses summed since the last record) and changes it only in its own
methods: the checkpoint saved (save_checkpoint) and resumed (resume), the evaluations that pick best.pt,
the log, and the stops (a signal on any rank, a non-finite loss, out of memory).
"""

import math
import os
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist
from tqdm import tqdm

from additions.model import model_args
from data.pipeline import to_device, too_many_objects
from detr import parameters_by_part
from lib.inference import evaluate, is_out_of_memory
from lib.metrics import plateau_warning, query_diagnostics
from lib.processes import (NONE_BAD, gather, on_master, out_of_memory, same_on_every_rank, stop_if_not_finite,
                           stop_signals)
from lib.weights import append_log, cut_log, write_checkpoint


def new_optimizer(model, cfg, device):
    """AdamW (paper §4) with the backbone at its own learning rate (fused: one kernel for all tensors, CPU
    too), and the loss scaler of float16, whose range is too narrow for small gradients: the loss is scaled
    up, and a step whose gradients overflow is skipped (without float16 the scaler does nothing)."""
    backbone = [p for p in model.backbone.parameters() if p.requires_grad]
    others = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("backbone.")]
    groups = [{"params": others, "lr": cfg.learning_rate, "base_lr": cfg.learning_rate},
              {"params": backbone, "lr": cfg.lr_backbone, "base_lr": cfg.lr_backbone}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=cfg.weight_decay, fused=True)
    return optimizer, torch.amp.GradScaler("cuda" if "cuda" in device else "cpu", enabled=cfg.dtype == "float16")


@torch.no_grad()
def ema_update(ema_model, model, decay):
    """ema = decay * ema + (1 - decay) * model for every parameter and floating buffer (BatchNorm's
    statistics too); other buffers are copied. After each optimizer step (RT-DETR's ModelEMA)."""
    for averaged, current in zip(ema_model.state_dict().values(), model.state_dict().values()):
        if averaged.dtype.is_floating_point:
            averaged.mul_(decay).add_(current, alpha=1 - decay)
        else:
            averaged.copy_(current)


def set_loss(criterion, outputs, targets, num_boxes, class_weight_sum):
    """The criterion's losses; where the matcher finds non-finite outputs, a NaN loss through every output
    instead, so that DDP's backward still meets the other ranks' and every rank stops at the next check."""
    try:
        return criterion(outputs, targets, num_boxes, class_weight_sum)
    except FloatingPointError:
        leaves = torch.utils._pytree.tree_leaves(outputs)
        return {"loss": sum(t.float().sum() for t in leaves if torch.is_tensor(t) and t.requires_grad) * math.nan}


@torch.no_grad()
def training_diagnostics(model, outputs, targets, criterion):
    """What shows DETR's early plateau (logged every log_interval, drawn by tools/analyses.py --log):
    grad_norm_<part> and weight_norm_<part> for each part of the model (detr.parameters_by_part), the
    gradient before clipping, and how alike the queries are and how close their boxes get to the objects
    at each decoder layer (metrics.query_diagnostics, from the criterion's matching)."""
    record = {}
    for name, params in parameters_by_part(model).items():
        grads = [p.grad.float().norm() for p in params if p.grad is not None]
        record[f"grad_norm_{name}"] = torch.stack(grads).norm().item() if grads else 0.0
        record[f"weight_norm_{name}"] = torch.stack([p.float().norm() for p in params]).norm().item()
    return {**record, **query_diagnostics(outputs, targets, **criterion.diagnostic_matching(outputs, targets))}


def describe(cfg, model, train_set, val_set, device, world_size):
    """The master's first lines: the data, the model and the machine, and a warning for each setting that
    leaves objects uncounted."""
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{cfg.dataset}: {len(train_set) if train_set else 0} train / {len(val_set)} val images, "
          f"{len(val_set.classes)} classes; model {n_params / 1e6:.2f}M trainable parameters; {device}, "
          f"{cfg.dtype}, world size {world_size}")
    if cfg.num_queries > cfg.max_dets:
        print(f"warning: num_queries={cfg.num_queries} but max_dets={cfg.max_dets}: COCO's mAP counts only the "
              f"{cfg.max_dets} best detections of an image and class (raise max_dets to count them all)")
    for warning in filter(None, (too_many_objects(d, cfg.num_queries) for d in (train_set, val_set) if d)):
        print(warning)


class Run:
    """One training run's state around the loop (train.py builds it once, after the model and optimizer)."""

    def __init__(self, cfg, process, model, optimizer, scaler, ema_model, val_set, checkpoint):
        self.cfg, self.model, self.optimizer, self.scaler, self.ema_model = cfg, model, optimizer, scaler, ema_model
        self.ddp, self.rank, self.world_size, self.device = process
        self.master, self.val_set = self.rank == 0, val_set
        self.ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
        self.iter_num = self.start_iter = self.checkpoint_iter = checkpoint["iter_num"] if checkpoint else 0
        self.best_val = checkpoint["best_val"] if checkpoint else -math.inf
        self.best_iter = checkpoint.get("best_iter", 0) if checkpoint else 0
        self.evaluation_due = bool(checkpoint and checkpoint.get("evaluation_due"))  # a signal cut it short
        self.metrics, self.writer, self.plateau_said, self.stop, self.signals = {}, None, False, False, []
        self.sums, self.steps, self.images, self.skipped_steps = {}, 0, 0, 0  # since the last log record
        self.first_bad_iter = torch.tensor(NONE_BAD, device=self.device)  # a loss first went non-finite here
        self.batch_shape = None  # the last batch moved to the device: what an out-of-memory line names
        self.t_start = self.t_log = self.t_checkpoint = time.time()  # open_log starts them again before the loop
        self.progress = None  # the progress bar, while the loop runs (guard)

    def resume(self, checkpoint):
        """A checkpoint's optimizer, scaler, EMA and RNG states into the run, at the config's learning rates (a
        resume may change them on purpose), and one line that says where it goes on from."""
        cfg, changed = self.cfg, []
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        for group, key in zip(self.optimizer.param_groups, ("learning_rate", "lr_backbone")):
            if group["base_lr"] != getattr(cfg, key):
                changed.append(f"{key} {group['base_lr']:g} -> {getattr(cfg, key):g}")
                group["base_lr"] = getattr(cfg, key)
        if self.master:
            best = (f"best val {cfg.best_metric} {self.best_val:.4f}" if self.best_val > -math.inf
                    else "no evaluation yet")
            print(f"init_from=resume: {self.ckpt_path} at iteration {self.iter_num}, {best}"
                  + (f"; {', '.join(changed)}" if changed else ""))
        if checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        if self.ema_model is not None and "ema_model" in checkpoint:
            self.ema_model.load_state_dict(checkpoint["ema_model"])
        rng = checkpoint["rng"]  # this process's own states
        torch.set_rng_state(rng["cpu"][self.rank % len(rng["cpu"])])
        if "cuda" in self.device and rng["cuda"]:
            torch.cuda.set_rng_state(rng["cuda"][self.rank % len(rng["cuda"])])

    def save_checkpoint(self, best=False, evaluation_due=False):
        """ckpt.pt (and best.pt), written by the master, with every process's RNG states (a resumed DDP run
        draws the same dropout masks); evaluation_due: a signal cut the evaluation at this step short."""
        rng = {"cpu": gather(torch.get_rng_state(), self.world_size),
               "cuda": gather(torch.cuda.get_rng_state(), self.world_size) if "cuda" in self.device else []}
        ckpt = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "model_args": model_args(self.model), "iter_num": self.iter_num, "best_val": self.best_val,
                "best_iter": self.best_iter, "config": vars(self.cfg), "classes": self.model.classes, "rng": rng,
                "cpu_threads": torch.get_num_threads(), "category_ids": self.val_set.category_ids,
                "scaler": self.scaler.state_dict(), "evaluation_due": evaluation_due,
                **({"ema_model": self.ema_model.state_dict()} if self.ema_model is not None else {})}

        def write():
            write_checkpoint(ckpt, self.ckpt_path)
            if best:
                write_checkpoint(ckpt, os.path.join(self.cfg.out_dir, "best.pt"))

        on_master(write, self.ddp, self.master, self.device)
        self.checkpoint_iter, self.t_checkpoint = self.iter_num, time.time()

    def open_log(self, resumed):
        """log.jsonl cut back to the checkpoint a resume goes on from; TensorBoard's writer if asked for."""
        if resumed and self.master:
            cut_log(self.cfg.out_dir, self.iter_num)
        if self.cfg.tensorboard and self.master:
            from torch.utils.tensorboard import SummaryWriter  # optional: imported only when asked for

            self.writer = SummaryWriter(os.path.join(self.cfg.out_dir, "tensorboard"))
        self.t_start = self.t_log = self.t_checkpoint = time.time()  # checkpoint_minutes' clock starts at the (re)start

    def evaluation_owed(self):
        """At an evaluation point (every eval_interval, and the end) not yet evaluated, or a resume whose
        evaluation a signal cut short."""
        n, cfg = self.iter_num, self.cfg
        return self.evaluation_due or ((n % cfg.eval_interval == 0 or n == cfg.max_iters) and self.checkpoint_iter != n)

    def evaluate_if_owed(self, eval_model):
        """At an evaluation point: the val metrics, printed and logged, then ckpt.pt, and best.pt when
        best_metric improved. A signal during it stops the run (the checkpoint then asks the resume to evaluate)."""
        if self.stop or not self.evaluation_owed():
            return
        cfg = self.cfg
        same_on_every_rank(eval_model, self.ddp)
        result = evaluate(eval_model, self.val_set, cfg, self.device, self.rank, self.world_size,
                          stop=lambda: bool(self.signals))
        if result is None:
            self.stop = True
            return
        self.metrics = metrics = {f"val_{k}": v for k, v in result.items()}
        improved = metrics[f"val_{cfg.best_metric}"] > self.best_val
        self.best_val = max(self.best_val, metrics[f"val_{cfg.best_metric}"])
        if improved:
            self.best_iter = self.iter_num
        if self.master:
            limit = f" (at most {cfg.max_dets} detections an image and class)" if cfg.num_queries > cfg.max_dets else ""
            aps = ", ".join(f"{c} {ap:.3f}" for c, ap in zip(self.val_set.classes, metrics["val_AP50_per_class"])
                            if ap == ap)
            tqdm.write(f"iter {self.iter_num}: val mAP50 {metrics['val_mAP50']:.4f}, mAP50 (VOC07) "
                       f"{metrics['val_mAP50_07']:.4f}, mAP {metrics['val_mAP']:.4f}{limit} | AP50 {aps}")
        record = {"iter": self.iter_num, "time": round(time.time() - self.t_start, 1), **metrics}
        on_master(lambda: append_log(cfg.out_dir, record, self.writer, self.val_set.classes), self.ddp, self.master,
                  self.device)
        self.save_checkpoint(improved)
        self.evaluation_due, self.t_log = False, time.time()  # the next record's img_per_s counts training alone

    def batch_to_device(self, images, mask, targets):
        """data.pipeline.to_device, keeping the batch's shape: what an out-of-memory line names."""
        self.batch_shape = images.shape
        return to_device(images, mask, targets, self.device)

    def diagnostics(self, model, outputs, targets, criterion, loss):
        """training_diagnostics, before clipping (what the loss asks of each part), at the steps that log."""
        log_now = self.master and (self.iter_num + 1) % self.cfg.log_interval == 0 and torch.isfinite(loss)
        return training_diagnostics(model, outputs, targets, criterion) if log_now else {}

    def add_losses(self, losses):
        """A micro-batch's losses, summed for the next record; the first iteration whose loss is not finite is
        kept on the device (checked at log and checkpoint points, where the host syncs anyway)."""
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0.0) + v.detach()
        self.first_bad_iter = torch.where(torch.isfinite(losses["loss"].detach()), self.first_bad_iter,
                                          self.first_bad_iter.clamp(max=self.iter_num))

    def optimizer_step(self):
        """The scaler's step (without float16, optimizer.step()), counting the steps float16 skipped: the
        scale drops when the gradients overflowed."""
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None  # a host sync: float16 only
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if scale is not None:
            self.skipped_steps += self.scaler.get_scale() < scale
        self.optimizer.zero_grad(set_to_none=True)
        if self.cfg.compile and self.master and self.iter_num == self.start_iter:
            tqdm.write(f"compiled: the first step took {time.time() - self.t_start:.0f} s")

    def end_step(self, images, diagnostics):
        """The step is done: the EMA follows the weights, the log record at log_interval (or before an
        evaluation), ckpt.pt on the checkpoint_minutes clock; a signal on any rank stops every rank after this
        same step."""
        self.iter_num, self.steps, self.images = self.iter_num + 1, self.steps + 1, self.images + images
        self.progress.update()
        if self.ema_model is not None:
            decay = self.cfg.ema_decay * (1 - math.exp(-self.iter_num / self.cfg.ema_warmup_iters))
            ema_update(self.ema_model, self.model, decay)
        if self.iter_num % self.cfg.log_interval == 0 or self.evaluation_owed():
            stop_if_not_finite(self.first_bad_iter, self.ddp, self.master, self.ckpt_path)  # before a log or save
            self.log_losses(diagnostics)
        stop = bool(self.signals)
        due = self.cfg.checkpoint_minutes > 0 and time.time() - self.t_checkpoint > 60 * self.cfg.checkpoint_minutes
        if self.ddp:  # the master's clock and any rank's signal decide for every rank
            flags = torch.tensor([stop, due and self.master], dtype=torch.int32, device=self.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            stop, due = bool(flags[0]), bool(flags[1])
        self.stop = stop
        if due and not stop and not self.evaluation_owed():  # an evaluation point writes it anyway
            stop_if_not_finite(self.first_bad_iter, self.ddp, self.master, self.ckpt_path)
            self.save_checkpoint()

    def log_losses(self, diagnostics):
        """The losses averaged over the steps since the last record (and the diagnostics at log_interval):
        printed and appended to log.jsonl by the master."""
        record = None
        if self.master:
            seconds = time.time() - self.t_log
            record = {"iter": self.iter_num, "time": round(time.time() - self.t_start, 1),
                      **{k: v.item() / self.steps for k, v in self.sums.items()},
                      "lr": self.optimizer.param_groups[0]["lr"], "img_per_s": self.images / seconds,
                      **({"skipped_steps": self.skipped_steps} if self.scaler.is_enabled() else {}), **diagnostics}
            self.progress.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.1e}",
                                      img_s=f"{record['img_per_s']:.1f}")
            tqdm.write(f"iter {self.iter_num}: "
                       + ", ".join(f"{k} {record[k]:.4f}" for k in ("loss", "loss_ce", "loss_bbox", "loss_giou"))
                       + f", lr {record['lr']:.1e}, {record['img_per_s']:.1f} img/s")
            warning = None if self.plateau_said else plateau_warning(record, self.cfg.warmup_iters)
            if warning:  # once a run
                tqdm.write(warning)
                self.plateau_said = True
        on_master(lambda: append_log(self.cfg.out_dir, record, self.writer), self.ddp, self.master, self.device)
        self.sums, self.steps, self.images, self.skipped_steps, self.t_log = {}, 0, 0, 0, time.time()

    @contextmanager
    def guard(self):
        """Around the loop: SIGTERM, SIGUSR1 and a first SIGINT stop the run after its step, which then writes
        ckpt.pt (lib/processes.stop_signals); out of memory in a step is one error line; the progress bar."""
        cfg = self.cfg
        with stop_signals() as self.signals, tqdm(total=cfg.max_iters, initial=self.iter_num, disable=not self.master,
                                                  dynamic_ncols=True) as self.progress:
            try:
                yield
            except RuntimeError as e:  # out of memory in a training step: torch's, or the CPU allocator's
                if not is_out_of_memory(e):
                    raise
                raise out_of_memory(self.iter_num, self.batch_shape, cfg, self.device, self.ckpt_path) from None
            if self.stop:  # pre-empted: ckpt.pt at this step, unless an evaluation has just written it
                if self.checkpoint_iter != self.iter_num or self.evaluation_owed():
                    stop_if_not_finite(self.first_bad_iter, self.ddp, self.master, self.ckpt_path)
                    self.save_checkpoint(evaluation_due=self.evaluation_owed())
                if self.master:
                    tqdm.write(f"{self.signals[0] if self.signals else 'a signal on another rank'}: stopped at "
                               f"iteration {self.iter_num}; {self.ckpt_path} written, resume with --init_from=resume")

    def finish(self):
        """The run's end: what it reached and what to do with it; the writer and the process group closed.
        Ctrl-C exits with the shell's status for an interrupted command, so that `train.py && ...` stops."""
        if self.master and not self.stop:
            best = os.path.join(self.cfg.out_dir, "best.pt")
            print(f"done: best val {self.cfg.best_metric} {self.best_val:.4f} at iteration {self.best_iter}, "
                  f"in {best}. "
                  f"Next: python sample.py --ckpt={best} (its detections drawn), python tools/eval.py --ckpt={best} "
                  f"(the report)")
        if self.writer is not None:
            self.writer.close()
        if self.ddp:
            dist.destroy_process_group()
        if self.signals and self.signals[0] == "SIGINT":
            raise SystemExit(130)
