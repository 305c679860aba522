"""
Train DETR on a prepared dataset (data/<name>/<split>.json, see data/*/prepare.py).

    python data/shapes/prepare.py && python train.py config/shapes.py      # CPU, minutes
    python train.py config/voc.py                                          # one 80 GB GPU (EXPERIMENTS.md, "Speed")
    torchrun --standalone --nproc_per_node=4 train.py config/voc.py        # DDP

Defaults sit below as globals; a config file (plain Python) overrides them, then --key=value.
The file goes in the order the data flows: the config, the data (data/pipeline.py), the Hungarian
matcher and set loss (the additions' terms extend them in additions/loss.py), then the training loop (mAP comes from
lib/metrics.py, every weight file from lib/weights.py). Everything above `train()` is importable on its own.
"""

import copy
import json
import math
import os
import sys
from importlib.util import find_spec
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torchvision.ops import box_convert, generalized_box_iou, generalized_box_iou_loss
from tqdm import tqdm

from additions.loss import AdditionsCriterion
from additions.model import additions_on, argument_problem, model_args
from configurator import VALUE_TYPES, configure, device_problem
from data.pipeline import load_datasets, training_batches
from lib.inference import autocast, compile_model, evaluate
from lib.processes import cpu_threads, same_on_every_rank, setup_process
from lib.run import Run, describe, new_optimizer, set_loss
from lib.weights import LoadError, check_out_dir, checkpoint_architecture, initial_model

# -----------------------------------------------------------------------------
# default config: the paper's DETR-R50 recipe (§4, App. A.4); config/*.py and --key=value override it
# I/O
out_dir = "out"  # ckpt.pt, best.pt and log.jsonl go here
dataset = "shapes"  # reads data/<dataset>/<train_split>.json and <val_split>.json (or <dataset>/... if it is a path)
train_split = "train"  # the split trained on
val_split = "val"  # the split evaluated every eval_interval (and that picks best.pt)
init_from = "scratch"  # 'scratch', 'resume' (out_dir/ckpt.pt), or weights to fine-tune: 'detr-r50', a file, a folder
eval_interval = 1000  # evaluate (and checkpoint) every this many iterations, and at the end
checkpoint_minutes = 0.0  # also write ckpt.pt this often, without evaluating (0: only at evaluations)
log_interval = 10  # print and log the losses every this many iterations
overwrite = False  # a new run into an out_dir holding a run deletes its ckpt.pt, best.pt, log.jsonl (else: an error)
eval_only = False  # evaluate the initial model and exit
best_metric = "mAP50"  # the val metric that decides best.pt
max_dets = 100  # detections per image and class that COCO's mAP and AR count (pycocotools' maxDets)
# model
backbone = "resnet50"  # a torchvision ResNet: resnet18, resnet34, resnet50 or resnet101
pretrained_backbone = True  # torchvision's ImageNet weights (the paper starts from them)
dilation = False  # DC5
frozen_bn = True  # the backbone's BatchNorm statistics frozen (pretrained); False to train it from scratch
trainable_layers = 3  # ResNet stages that learn, from the top: 3 (layer2-4) as the paper, 5 from scratch
hidden_dim = 256  # the transformer's width d
num_heads = 8  # attention heads
num_encoder_layers = 6  # the paper's 6 + 6
num_decoder_layers = 6  # each one's outputs get the auxiliary loss
dim_feedforward = 2048  # the width of each layer's feed-forward network
dropout = 0.1  # in every transformer layer
num_queries = 100  # object queries N: the most objects one image can have detected
# additions beyond the paper (additions/model.py), all off: the paper's DETR
feature_stride = 32  # 16 or 8: backbone features from layer3 or layer2, a finer token grid for small images
anchor_queries = False  # DAB-DETR: queries are boxes, refined by every decoder layer
encoder_proposals = False  # two-stage: the encoder's best tokens start the queries' boxes (needs anchor_queries)
denoising_groups = 0  # DN-DETR: this many noised copies of the ground truth as extra queries (needs anchor_queries)
query_groups = 1  # Group DETR: this many groups of queries in training, each matched one-to-one
conditional_cross_attn = False  # Conditional DETR / DAB-DETR: a box-made spatial query (needs anchor_queries)
cls_loss = "ce"  # 'ce' (the paper's softmax), or sigmoids: 'focal' (Deformable DETR, DINO), 'iou_aware' (DEIM)
look_forward_twice = False  # DINO: a layer's box loss trains the layer before too (needs anchor_queries)
dn_contrastive = False  # DINO: each denoising group gets negatives that say "no object" (needs denoising_groups)
mosaic_prob = 0.0  # DEIM: the chance that a training image is a mosaic of 4 (data/pipeline.py), until mosaic_until
mosaic_until = 0.5  # the fraction of max_iters after which no image is a mosaic (DEIM: about half)
# loss (paper §3.1 and App. A.1): matching costs; the box costs are the box losses' weights too (class loss: 1)
cost_class = 1.0  # the class probability's weight in the matching cost
cost_bbox = 5.0  # lambda_L1: the L1 box distance
cost_giou = 2.0  # lambda_iou: the generalised IoU
eos_coef = 0.1  # weight of the "no object" class in the cross-entropy
# data
batch_size = 2  # images per micro-batch on each process
gradient_accumulation_steps = 1  # micro-batches per optimizer step
num_workers = 2  # data-loading processes
train_scales = list(range(480, 801, 32))  # shorter side, drawn at random per image
max_size = 1333  # longer side at most
crop_scales = [400, 500, 600]  # resize before the random crop
crop_size = (384, 600)  # random crop side range
val_scale = 800  # shorter side at validation
pad_to = 1  # pad batches to a multiple of this (e.g. 64 for fewer shapes under torch.compile)
keep_difficult = False  # train on VOC's difficult objects too
# optimizer (paper §4): AdamW, backbone at a tenth of the rest, gradients clipped at 0.1
learning_rate = 1e-4  # the transformer's and heads' rate
lr_backbone = 1e-5  # 0 freezes the backbone
weight_decay = 1e-4  # AdamW's
grad_clip = 0.1  # the gradients' total norm is clipped to this (0: no clipping)
max_iters = 100000  # optimizer steps
warmup_iters = 0  # linear warm-up from 0
lr_schedule = "step"  # after the warm-up: 'step' (the paper's x0.1 at lr_drop) or 'cosine' (to min_lr_ratio)
lr_drop = 70000  # 'step': multiply the learning rates by 0.1 from this iteration on
min_lr_ratio = 0.01  # 'cosine': the rates at max_iters, as a fraction of their own
ema_decay = 0.0  # > 0: evaluate and keep an exponential moving average of the weights (RT-DETR: 0.9999); 0 is off
ema_warmup_iters = 2000  # the EMA's decay grows as 1 - exp(-iter / this), so early steps are not averaged with the init
# system
device = "cuda" if torch.cuda.is_available() else "cpu"  # cuda (a GPU) or cpu
dtype = "bfloat16" if torch.cuda.is_available() else "float32"  # autocast's; float32: off; float16 adds a loss scaler
compile = False  # torch.compile the backbone and the transformer layers (lib/inference.compile_model)
seed = 1337  # the weights' init, the data order and the augmentation
tensorboard = False  # also write every logged scalar to out_dir/tensorboard (pip install tensorboard)
CONFIG_KEYS = [k for k, v in globals().items() if k.islower() and not k.startswith("_") and isinstance(v, VALUE_TYPES)]

# -----------------------------------------------------------------------------
# Hungarian matcher and set loss (paper §3.1, App. A.1)


class HungarianMatcher(nn.Module):
    """The optimal one-to-one assignment between predictions and targets (paper Eq. 1): the cost of
    pairing query i with target j is -p_i(c_j) * cost_class + L1(b_i, b_j) * cost_bbox
    - GIoU(b_i, b_j) * cost_giou. One cost matrix for the whole batch (every query against every
    target of the batch, for every decoder layer given), one copy to the CPU, then scipy's
    linear_sum_assignment per image and layer."""

    def __init__(self, cost_class=1.0, cost_bbox=5.0, cost_giou=2.0):
        super().__init__()
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou

    @torch.no_grad()
    def forward(self, outputs, targets):
        """outputs: pred_logits (B, Q, K+1) and pred_boxes (B, Q, 4), or with a leading layer dimension
        (L, B, Q, ...). Returns per image a (pred_idx, tgt_idx) pair of LongTensors, or a list of those
        per layer when a layer dimension was given."""
        (cost,) = self.to_host([self.cost(outputs, targets)])
        indices = self.assign(cost, targets)
        return indices if outputs["pred_logits"].dim() == 4 else indices[0]

    def cost(self, outputs, targets, parts=False):
        """(L, B, Q, T): every query of every layer against every target of the batch; parts: the
        three weighted terms apart, [class, L1, GIoU] (tools/analyses.py --matching draws them)."""
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if logits.dim() == 3:
            logits, boxes = logits[None], boxes[None]
        L, B, Q = logits.shape[:3]
        logits, boxes = logits.flatten(0, 2).float(), boxes.flatten(0, 2).float()  # (L*B*Q, K+1), (L*B*Q, 4)
        tgt_labels = torch.cat([t["labels"] for t in targets])  # (T,) all targets of the batch
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).float()  # (T, 4)
        terms = [
            self.cost_class * -logits.softmax(-1)[:, tgt_labels],  # the probability itself, not its log (App. A.1)
            self.cost_bbox * torch.cdist(boxes, tgt_boxes, p=1),
            -self.cost_giou * generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"),
                                                  box_convert(tgt_boxes, "cxcywh", "xyxy")),
        ]
        if parts:
            return [t.view(L, B, Q, -1) for t in terms]
        return (terms[0] + terms[1] + terms[2]).view(L, B, Q, -1)

    @staticmethod
    def to_host(costs):
        """Cost tensors as numpy arrays, in one copy to the host (a GPU sync). A non-finite cost is a model
        whose outputs went NaN: the loop's set_loss turns it into a NaN loss."""
        host = torch.cat([c.flatten() for c in costs]).cpu().numpy()
        if not np.isfinite(host).all():
            raise FloatingPointError("the model's outputs are not finite")
        bounds = np.cumsum([0] + [c.numel() for c in costs])
        return [host[lo:hi].reshape(c.shape) for c, lo, hi in zip(costs, bounds[:-1], bounds[1:])]

    @staticmethod
    def assign(cost, targets):
        """cost (L, B, Q, T) on the host -> per layer, per image, (pred_idx, tgt_idx) of the cheapest
        one-to-one assignment (the image's own targets are its columns of the batch's)."""
        split = np.cumsum([len(t["labels"]) for t in targets])[:-1]
        indices = []
        for layer in cost:
            per_image = []
            for b, cb in enumerate(np.split(layer, split, axis=-1)):  # cb[b]: (Q, b's targets)
                pred, tgt = linear_sum_assignment(cb[b])
                per_image.append((torch.as_tensor(pred, dtype=torch.int64), torch.as_tensor(tgt, dtype=torch.int64)))
            indices.append(per_image)
        return indices


class SetCriterion(nn.Module):
    """DETR's set loss (paper Eq. 2): after matching, cross-entropy on every query (the "no object"
    class weighted by eos_coef), and L1 + GIoU on the matched boxes, for the last decoder layer
    and each auxiliary one. Returns loss_ce, loss_bbox, loss_giou (last layer), loss_ce_0 ...
    loss_giou_{L-2} (auxiliary layers) and `loss`, their weighted sum. Box losses are divided by
    num_boxes (the batch's target count; under DDP the mean over processes, at least 1), the
    cross-entropy by the sum of its class weights (class_weight_sum), as a weighted mean does. Both
    may be counts of a whole accumulated batch: accumulation then gives exactly the gradients of
    one big batch."""

    def __init__(self, matcher, eos_coef=0.1, weight_ce=1.0, weight_bbox=5.0, weight_giou=2.0):
        super().__init__()
        self.matcher, self.eos_coef = matcher, eos_coef
        self.weight_ce, self.weight_bbox, self.weight_giou = weight_ce, weight_bbox, weight_giou

    def forward(self, outputs, targets, num_boxes=None, class_weight_sum=None):
        logits, boxes = self.stack_layers(outputs)  # (L, B, Q, ...): every decoder layer at once, the last last
        num_boxes = self.mean_num_boxes(targets, num_boxes, logits.device)
        if class_weight_sum is None:
            class_weight_sum = self.cross_entropy_normaliser(targets, logits.shape[2], self.eos_coef)
        indices = self.matcher({"pred_logits": logits, "pred_boxes": boxes}, targets)
        ce, l1, giou = self.summed_losses(logits, boxes, targets, indices, self.eos_coef)  # (L,) each
        return self.weigh({"": (ce / class_weight_sum, l1 / num_boxes, giou / num_boxes)})

    @staticmethod
    def stack_layers(outputs):
        """The logits and boxes of every decoder layer, (L, B, Q, ...) in float32."""
        layers = outputs.get("aux_outputs", []) + [outputs]
        return (torch.stack([o["pred_logits"] for o in layers]).float(),
                torch.stack([o["pred_boxes"] for o in layers]).float())

    @staticmethod
    def mean_num_boxes(targets, num_boxes, device):
        """The targets that normalise the box losses: the batch's (or num_boxes, a whole accumulated batch's),
        averaged over DDP's processes, at least 1."""
        if num_boxes is None:
            num_boxes = sum(len(t["labels"]) for t in targets)
        num_boxes = torch.as_tensor(num_boxes, dtype=torch.float32, device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(num_boxes)
            num_boxes /= dist.get_world_size()
        return num_boxes.clamp(min=1)

    def summed_losses(self, logits, boxes, targets, indices, no_object_weight):
        """Per layer (L,): the cross-entropy summed over every query (the unmatched ones target "no
        object", weighted by no_object_weight: eos_coef, or (B, Q) a weight for each query), and L1 and
        GIoU summed over the matched pairs. logits (L, B, Q, K+1), boxes (L, B, Q, 4); indices: per
        layer, per image, a (pred_idx, tgt_idx) pair."""
        L, B, Q = logits.shape[:3]
        pairs = self.matched_pairs(targets, indices, logits.device)
        target_classes = torch.full((L, B, Q), logits.shape[-1] - 1, dtype=torch.int64, device=logits.device)
        target_classes[pairs[:3]] = pairs[3]  # the matched queries' classes, "no object" (K) elsewhere
        ce = F.cross_entropy(logits.flatten(0, 2), target_classes.flatten(), reduction="none").view(L, B, Q)
        ce = ce * torch.where(target_classes == logits.shape[-1] - 1, no_object_weight, 1.0)
        return (ce.view(L, -1).sum(1), *self.box_losses(boxes, pairs, L))

    @staticmethod
    def matched_pairs(targets, indices, device):
        """indices as index tensors (M,) each: layer, image and query of every matched pair, and the
        class (M,) and box (M, 4) of its target. Built on the host, copied in one (pinned) copy."""
        first = np.cumsum([0] + [len(t["labels"]) for t in targets]).tolist()  # each image's first target
        index = torch.cat([torch.stack([torch.full_like(p, layer), torch.full_like(p, b), p, j + first[b]])
                           for layer, per_image in enumerate(indices) for b, (p, j) in enumerate(per_image)], dim=1)
        index = (index.pin_memory() if device.type == "cuda" else index).to(device, non_blocking=True)
        layer_idx, image_idx, query_idx, target_idx = index
        tgt_labels = torch.cat([t["labels"] for t in targets]).to(device)[target_idx]
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).to(device)[target_idx]
        return layer_idx, image_idx, query_idx, tgt_labels, tgt_boxes

    @staticmethod
    def box_losses(boxes, pairs, num_layers):
        """Per layer (L,): the L1 and GIoU losses summed over the matched pairs (matched_pairs')."""
        layer_idx, image_idx, query_idx, _, tgt_boxes = pairs
        src_boxes = boxes[layer_idx, image_idx, query_idx]  # (M, 4)
        src_xyxy, tgt_xyxy = box_convert(src_boxes, "cxcywh", "xyxy"), box_convert(tgt_boxes.float(), "cxcywh", "xyxy")
        l1 = F.l1_loss(src_boxes, tgt_boxes.float(), reduction="none").sum(1)  # (M,)
        giou = generalized_box_iou_loss(src_xyxy, tgt_xyxy)
        zeros = torch.zeros(num_layers, device=boxes.device)
        return zeros.index_add(0, layer_idx, l1), zeros.index_add(0, layer_idx, giou)

    def weigh(self, terms):
        """{suffix: (ce, l1, giou) per layer} -> the named losses and `loss`, their weighted sum. Only the
        suffix "" (the decoder's) is logged for every layer; other terms for their last."""
        total = sum((self.weight_ce * ce + self.weight_bbox * l1 + self.weight_giou * giou).sum()
                    for ce, l1, giou in terms.values())
        losses = {"loss": total}
        for term, (loss_ce, loss_bbox, loss_giou) in terms.items():
            last = len(loss_ce) - 1
            for layer in range(last + 1) if term == "" else [last]:
                suffix = term if layer == last else f"{term}_{layer}"
                losses.update({"loss_ce" + suffix: loss_ce[layer], "loss_bbox" + suffix: loss_bbox[layer],
                               "loss_giou" + suffix: loss_giou[layer]})
        return losses

    def diagnostic_matching(self, outputs, targets):
        """What metrics.query_diagnostics takes beside outputs and targets: the last layer's matching."""
        return {"num_queries": outputs["pred_logits"].shape[1], "matched": self.matcher(outputs, targets)}

    @staticmethod
    def cross_entropy_normaliser(targets, num_queries, eos_coef):
        """The sum of the cross-entropy's class weights over num_queries queries an image: 1 for each matched
        query, eos_coef for each "no object". The loop computes it once over a whole accumulated batch."""
        matched = sum(min(len(t["labels"]), num_queries) for t in targets)
        return matched + eos_coef * (len(targets) * num_queries - matched)


# -----------------------------------------------------------------------------
# config, model, evaluation


def get_config(argv):
    """The defaults above, overridden by config files and --key=value (configurator.py), then checked
    (check_config), so that a bad value is one error line before any work. Fine-tuning a minidetr
    checkpoint takes its architecture for every model key that no config file or flag sets, as a resume does."""
    given = set()
    config = configure({k: globals()[k] for k in CONFIG_KEYS}, argv, config_files=True, given=given)
    if config["init_from"] not in ("scratch", "resume"):
        taken = {k: v for k, v in checkpoint_architecture(config["init_from"]).items()
                 if k in config and k not in given and config[k] != v}
        if taken and os.environ.get("RANK", "0") == "0":
            print(f"init_from={config['init_from']}: its architecture, which no config file or flag sets: "
                  + ", ".join(f"{k}={v!r}" for k, v in taken.items()))
        config.update(taken)
    check_config(SimpleNamespace(**config))
    return config


def check_config(c):
    """One error line for the first value out of its range (the types are already right): the training
    keys' rules here, then the model's, which additions.model.argument_problem holds for the model too.
    c: the config as train() reads it (its keys as attributes)."""
    def positive_ints(v):
        return len(v) > 0 and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v)

    rules = [
        *((k, getattr(c, k) >= 1, ">= 1") for k in ("batch_size", "gradient_accumulation_steps", "max_iters",
                                                   "eval_interval", "log_interval", "val_scale", "pad_to",
                                                   "ema_warmup_iters", "max_dets")),
        *((k, getattr(c, k) >= 0, ">= 0") for k in ("num_workers", "warmup_iters", "lr_drop")),
        *((k, math.isfinite(getattr(c, k)) and getattr(c, k) >= 0, "a number >= 0") for k in (
            "learning_rate", "lr_backbone", "weight_decay", "grad_clip", "cost_class", "cost_bbox", "cost_giou")),
        ("eos_coef", 0 < c.eos_coef <= 1, "in (0, 1]"),
        ("ema_decay", 0 <= c.ema_decay < 1, "in [0, 1) (0: no EMA)"),
        ("lr_schedule", c.lr_schedule in ("step", "cosine"), "'step' or 'cosine'"),
        *((k, 0 <= getattr(c, k) <= 1, "in [0, 1]") for k in ("min_lr_ratio", "mosaic_prob", "mosaic_until")),
        ("tensorboard", not c.tensorboard or find_spec("tensorboard") is not None,
         "False without the tensorboard package (pip install tensorboard)"),
        ("train_scales", positive_ints(c.train_scales), "a list of sizes > 0"),
        ("crop_scales", positive_ints(c.crop_scales), "a list of sizes > 0"),
        ("crop_size", len(c.crop_size) == 2 and positive_ints(c.crop_size) and c.crop_size[0] <= c.crop_size[1],
         "(min, max) sizes with 0 < min <= max"),
        ("max_size", positive_ints(c.train_scales) and c.max_size > max([*c.train_scales, c.val_scale]),
         "larger than every train_scale and val_scale"),
        ("dtype", c.dtype in ("float32", "bfloat16", "float16"), "float32, bfloat16 or float16"),
        ("best_metric", c.best_metric in ("mAP50", "mAP50_07", "mAP", "mAP75"), "mAP50, mAP50_07, mAP or mAP75"),
        ("dataset", c.dataset != "", "a prepared dataset's name or folder"),
        ("device", device_problem(c.device) is None, "cpu, or cuda on a machine with a GPU"),
    ]
    problem = next(((key, want) for key, ok, want in rules if not ok), None) or argument_problem(vars(c))
    if problem:
        raise SystemExit(f"error: {problem[0]}={getattr(c, problem[0])!r} must be {problem[1]}")


def new_criterion(cfg, architecture):
    """The set loss with the config's costs, which are also the loss weights (paper App. A.1); for a model with
    an addition on (architecture: its model_args, a resumed checkpoint's), the additions' around it."""
    criterion = SetCriterion(HungarianMatcher(cfg.cost_class, cfg.cost_bbox, cfg.cost_giou), cfg.eos_coef, 1.0,
                             cfg.cost_bbox, cfg.cost_giou)
    if additions_on(architecture):
        return AdditionsCriterion(criterion, architecture["query_groups"], architecture["cls_loss"])
    return criterion


def lr_factor(it, cfg):
    """Linear warm-up, then the paper's single step drop by 10x at lr_drop, or a cosine from 1 to
    min_lr_ratio at max_iters (lr_schedule='cosine', as most of DETR's successors)."""
    if it < cfg.warmup_iters:
        return (it + 1) / cfg.warmup_iters
    if cfg.lr_schedule == "cosine":
        progress = (it - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * (1 + math.cos(math.pi * progress)) / 2
    return 0.1 if it >= cfg.lr_drop else 1.0


# -----------------------------------------------------------------------------
# training


def train(config):
    """Run training with a config dict (get_config's); returns the model and its last validation metrics."""
    cfg = SimpleNamespace(**config)
    ddp, rank, world_size, device = setup_process(cfg)
    if not cfg.eval_only:
        check_out_dir(cfg, rank == 0)
    torch.manual_seed(cfg.seed + rank)
    if "cuda" in device:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    train_set, val_set = load_datasets(cfg)
    model, checkpoint = initial_model(cfg, val_set.classes)
    if device == "cpu" and not ddp:  # a thread per free core; a resume keeps its run's (another count sums differently)
        torch.set_num_threads((checkpoint or {}).get("cpu_threads") or cpu_threads())
    model.classes = val_set.classes
    model.to(device)
    if "cuda" in device:  # NHWC convolutions run on tensor cores without layout transposes
        model.backbone.to(memory_format=torch.channels_last)
    optimizer, scaler = new_optimizer(model, cfg, device)
    # the EMA of the weights (RT-DETR), which evaluation and best.pt use; a new one starts from the weights
    ema_model = copy.deepcopy(model).eval().requires_grad_(False) if cfg.ema_decay > 0 else None
    run = Run(cfg, (ddp, rank, world_size, device), model, optimizer, scaler, ema_model, val_set, checkpoint)
    if checkpoint is not None:
        run.resume(checkpoint)
    if cfg.compile:
        compile_model(model)
    raw_model = eval_model = model  # not the DDP wrapper: its forward is a collective, and shards may differ by a batch
    if ddp:
        model = DDP(model, device_ids=[device] if "cuda" in device else None)
    if ema_model is not None:
        eval_model = ema_model
        same_on_every_rank(ema_model, ddp)  # DDP gave every rank rank 0's weights: the EMA starts from them too
    architecture = model_args(raw_model)  # the model's own arguments (a resume's are its checkpoint's)
    criterion = new_criterion(cfg, architecture).to(device)
    denoising = architecture["denoising_groups"] > 0  # its queries copy the targets (additions/model.py)
    if rank == 0:
        describe(cfg, raw_model, train_set, val_set, device, world_size)
    if cfg.eval_only:
        same_on_every_rank(eval_model, ddp)
        metrics = evaluate(eval_model, val_set, cfg, device, rank, world_size)
        if rank == 0:
            print(json.dumps(metrics))
        return raw_model, metrics
    batches = training_batches(train_set, cfg, run.iter_num * cfg.batch_size * cfg.gradient_accumulation_steps,
                               rank, world_size, pin_memory="cuda" in device)
    run.open_log(resumed=checkpoint is not None)  # the clocks start here
    if cfg.compile and rank == 0:
        tqdm.write("compiling the backbone and the transformer layers (compile_model): the first step takes longer")
    with run.guard():  # signals stop every rank after its step; out of memory is one error line
        while True:
            run.evaluate_if_owed(eval_model)  # every eval_interval and at the end: val mAP, ckpt.pt, best.pt
            if run.stop or run.iter_num >= cfg.max_iters:
                break

            # one optimizer step: gradient_accumulation_steps micro-batches, normalised as one batch
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * lr_factor(run.iter_num, cfg)
            micro_batches = [next(batches) for _ in range(cfg.gradient_accumulation_steps)]
            all_targets = [t for _, _, targets in micro_batches for t in targets]
            num_boxes = sum(len(t["labels"]) for t in all_targets)  # local: the criterion averages it over processes
            class_weight_sum = SetCriterion.cross_entropy_normaliser(all_targets, raw_model.num_queries, cfg.eos_coef)
            for micro_step, batch in enumerate(micro_batches):
                images, mask, targets = run.batch_to_device(*batch)
                if ddp:  # all-reduce the gradients once, after the last micro-batch (as DDP.no_sync() would)
                    model.require_backward_grad_sync = micro_step == cfg.gradient_accumulation_steps - 1
                with autocast(device, cfg.dtype):
                    outputs = model(images, mask, targets) if denoising else model(images, mask)
                losses = set_loss(criterion, outputs, targets, num_boxes, class_weight_sum)
                scaler.scale(losses["loss"]).backward()
                run.add_losses(losses)  # summed for the log, and checked for a non-finite loss
            scaler.unscale_(optimizer)  # float16: clipping and the logged norms see the true gradients
            diagnostics = run.diagnostics(raw_model, outputs, targets, criterion, losses["loss"])  # before clipping
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
            run.optimizer_step()  # float16's scaler may skip it (counted in the log)
            run.end_step(len(all_targets) * world_size, diagnostics)  # the log, the EMA, ckpt.pt on the clock, signals
    run.finish()
    return raw_model, run.metrics


if __name__ == "__main__":
    made_out_dir = None  # the out_dir this run creates (the master's): removed again if the run ends with nothing in it
    try:
        config = get_config(sys.argv[1:])
        if not os.path.isdir(config["out_dir"]) and os.environ.get("RANK", "0") == "0":
            made_out_dir = config["out_dir"]
        train(config)
    except LoadError as e:  # a checkpoint or weights that cannot be loaded: one line, no traceback
        raise SystemExit(f"error: {e}")
    except RuntimeError as e:  # under torchrun, a rank that stopped (its own line says why) while this one waited on it
        if "RANK" not in os.environ or not (isinstance(e, dist.DistError) or "by peer" in str(e)):  # gloo's closed
            raise
        raise SystemExit(f"error: rank {os.environ['RANK']} stopped: another rank of the run did "
                         f"({type(e).__name__})") from None
    finally:  # a run that failed before it wrote anything (no dataset, a failed download) leaves no empty folder
        if made_out_dir and os.path.isdir(made_out_dir) and not os.listdir(made_out_dir):
            os.rmdir(made_out_dir)
