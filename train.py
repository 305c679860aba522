"""
Train DETR on a prepared dataset (data/<name>/<split>.json, see data/*/prepare.py).

    python data/shapes/prepare.py && python train.py config/shapes.py      # CPU, minutes
    python train.py config/voc.py                                          # one 80 GB GPU (EXPERIMENTS.md, "Speed")
    torchrun --standalone --nproc_per_node=4 train.py config/voc.py        # DDP

Defaults sit below as globals; a config file (plain Python) overrides them, then --key=value.
The file goes in the order the data flows: the config, the data (data/pipeline.py), the Hungarian
matcher and set loss (each addition's terms beside it), then the training loop (mAP comes from
lib/metrics.py, every weight file from lib/weights.py). Everything above `train()` is importable on its own.
"""

import copy
import json
import math
import os
import sys
import time
from contextlib import nullcontext
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

from configurator import VALUE_TYPES, configure, device_problem
from data.pipeline import load_datasets, to_device, too_many_objects, training_batches
from detr import argument_problem, parameters_by_part
from lib.inference import autocast, compile_model, evaluate, is_out_of_memory
from lib.metrics import paired_iou, plateau_warning, query_diagnostics
from lib.processes import (NONE_BAD, cpu_threads, gather, on_master, out_of_memory, same_on_every_rank, setup_process,
                       stop_if_not_finite, stop_signals)
from lib.weights import (LoadError, append_log, check_out_dir, checkpoint_architecture, cut_log, initial_model,
                     save_checkpoint)

# -----------------------------------------------------------------------------
# default config: the paper's DETR-R50 recipe (§4, App. A.4); config/*.py and --key=value override it
# I/O
out_dir = "out"  # ckpt.pt, best.pt and log.jsonl go here
dataset = "shapes"  # reads data/<dataset>/<train_split>.json and <val_split>.json (or <dataset>/... if it is a path)
train_split = "train"  # the split trained on
val_split = "val"  # the split evaluated every eval_interval (and that picks best.pt)
init_from = "scratch"  # 'scratch', 'resume' (out_dir/ckpt.pt), or weights to fine-tune: an official checkpoint ('detr-r50' or a .pth), a transformers folder / hub id or a minidetr checkpoint
eval_interval = 1000  # evaluate (and checkpoint) every this many iterations, and at the end
checkpoint_minutes = 0.0  # also write ckpt.pt this often, without evaluating (0: only at evaluations)
log_interval = 10  # print and log the losses every this many iterations
overwrite = False  # a new run into an out_dir that holds a run deletes its ckpt.pt, best.pt and log.jsonl (else: an error)
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
# additions beyond the paper (detr.py, "Additions beyond the paper"), all off: the paper's DETR
feature_stride = 32  # 16 or 8: backbone features from layer3 or layer2, a finer token grid for small images
anchor_queries = False  # DAB-DETR: queries are boxes, refined by every decoder layer
encoder_proposals = False  # two-stage: the encoder's best tokens start the queries' boxes (needs anchor_queries)
denoising_groups = 0  # DN-DETR: this many noised copies of the ground truth as extra queries (needs anchor_queries)
query_groups = 1  # Group DETR: this many groups of queries in training, each matched one-to-one
conditional_cross_attn = False  # Conditional DETR / DAB-DETR: a spatial query from each box in cross-attention (needs anchor_queries)
cls_loss = "ce"  # the class loss: 'ce' (the paper's softmax), 'focal' (Deformable DETR, DINO) or 'iou_aware' (DEIM's MAL): sigmoid
look_forward_twice = False  # DINO: a layer's box loss trains the layer before too (needs anchor_queries)
dn_contrastive = False  # DINO: each denoising group also gets negatives, trained to say "no object" (needs denoising_groups)
mosaic_prob = 0.0  # DEIM: the chance that a training image is a mosaic of 4 (data/pipeline.py), until mosaic_until
mosaic_until = 0.5  # the fraction of max_iters after which no image is a mosaic (DEIM: about half)
# loss (paper §3.1 and App. A.1): matching costs; the box costs are the box losses' weights too (the class loss weighs 1)
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
lr_schedule = "step"  # after the warm-up: 'step' (the paper's: x0.1 at lr_drop) or 'cosine' (down to min_lr_ratio at max_iters)
lr_drop = 70000  # 'step': multiply the learning rates by 0.1 from this iteration on
min_lr_ratio = 0.01  # 'cosine': the rates at max_iters, as a fraction of their own
ema_decay = 0.0  # > 0: evaluate and keep an exponential moving average of the weights (RT-DETR: 0.9999); 0 is off
ema_warmup_iters = 2000  # the EMA's decay grows as 1 - exp(-iter / this), so early steps are not averaged with the init
# system
device = "cuda" if torch.cuda.is_available() else "cpu"  # cuda (a GPU) or cpu
dtype = "bfloat16" if torch.cuda.is_available() else "float32"  # autocast dtype; float32 turns AMP off, float16 adds a loss scaler
compile = False  # torch.compile the backbone and the transformer layers (compile_model below)
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

    def __init__(self, cost_class=1.0, cost_bbox=5.0, cost_giou=2.0, sigmoid=False):
        super().__init__()
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.sigmoid = sigmoid  # addition 6: sigmoid class scores, the focal loss's cost

    @torch.no_grad()
    def forward(self, outputs, targets, groups=1):
        """outputs: pred_logits (B, Q, K+1) and pred_boxes (B, Q, 4), or with a leading layer
        dimension (L, B, Q, ...), and optionally valid (B, Q), False for queries that must not be
        matched (padding). Returns per image a (pred_idx, tgt_idx) pair of LongTensors, or a list of
        those per layer when a layer dimension was given. groups > 1 (Group DETR): the queries are
        that many equal groups, each matched on its own; an image's pairs of every group come together."""
        return self.match_sets([(outputs, groups)], targets)[0]

    @torch.no_grad()
    def match_sets(self, sets, targets):
        """forward for several (outputs, groups) at once, e.g. the decoder's and the encoder proposals':
        their costs reach the host in one copy. Returns their results (the loss copies each set's
        matched indices back to the device in one pinned, non-blocking copy)."""
        costs = [self.cost(outputs, targets) for outputs, _ in sets]  # (L, B, Q, T) each
        host = torch.cat([c.flatten() for c in costs]).cpu().numpy()
        if not np.isfinite(host).all():
            raise FloatingPointError("the model's outputs are not finite")
        bounds = np.cumsum([0] + [c.numel() for c in costs])
        split = np.cumsum([len(t["labels"]) for t in targets])[:-1]
        results = []
        for (outputs, groups), c, lo, hi in zip(sets, costs, bounds[:-1], bounds[1:]):
            L, B, Q, _ = c.shape
            n = Q // groups
            indices = []
            for layer in host[lo:hi].reshape(c.shape):
                per_image = []
                for b, cb in enumerate(np.split(layer, split, axis=-1)):  # cb[b]: (Q, b's targets)
                    pairs = [linear_sum_assignment(cb[b, g * n : (g + 1) * n]) for g in range(groups)]  # groups: addition 4
                    pred = np.concatenate([p + g * n for g, (p, _) in enumerate(pairs)])
                    tgt = np.concatenate([t for _, t in pairs])
                    per_image.append((torch.as_tensor(pred, dtype=torch.int64), torch.as_tensor(tgt, dtype=torch.int64)))
                indices.append(per_image)
            results.append(indices if outputs["pred_logits"].dim() == 4 else indices[0])
        return results

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
            self.cost_class * (focal_matching_cost(logits, tgt_labels) if self.sigmoid  # addition 6
                               else -logits.softmax(-1)[:, tgt_labels]),  # the probability itself, not its log (App. A.1)
            self.cost_bbox * torch.cdist(boxes, tgt_boxes, p=1),
            -self.cost_giou * generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"), box_convert(tgt_boxes, "cxcywh", "xyxy")),
        ]
        if parts:
            return [t.view(L, B, Q, -1) for t in terms]
        cost = (terms[0] + terms[1] + terms[2]).view(L, B, Q, -1)
        if "valid" in outputs:  # addition 2: the proposals of padding tokens are never matched
            cost = cost.masked_fill(~outputs["valid"][None, :, :, None], 1e6)
        return cost


class SetCriterion(nn.Module):
    """DETR's set loss (paper Eq. 2): after matching, cross-entropy on every query (the "no object"
    class weighted by eos_coef), and L1 + GIoU on the matched boxes, for the last decoder layer
    and each auxiliary one. Returns loss_ce, loss_bbox, loss_giou (last layer), loss_ce_0 ...
    loss_giou_{L-2} (auxiliary layers) and `loss`, their weighted sum. Box losses are divided by
    num_boxes (the batch's target count; under DDP the mean over processes, at least 1), the
    cross-entropy by the sum of its class weights (class_weight_sum), as a weighted mean does. Both
    may be counts of a whole accumulated batch: accumulation then gives exactly the gradients of
    one big batch. The additions enter at marked lines: query groups (each matched on its own, their
    losses averaged), a sigmoid cls_loss (loss_ce, over num_boxes), loss_*_enc and loss_*_dn (sections below)."""

    def __init__(self, matcher, eos_coef=0.1, weight_ce=1.0, weight_bbox=5.0, weight_giou=2.0, query_groups=1, cls_loss="ce"):
        super().__init__()
        self.matcher, self.eos_coef = matcher, eos_coef
        self.weight_ce, self.weight_bbox, self.weight_giou = weight_ce, weight_bbox, weight_giou
        self.query_groups, self.cls_loss = query_groups, cls_loss

    def forward(self, outputs, targets, num_boxes=None, class_weight_sum=None):
        # every decoder layer at once: (L, B, Q, ...), the last layer last
        layers = outputs.get("aux_outputs", []) + [outputs]
        logits = torch.stack([o["pred_logits"] for o in layers]).float()
        boxes = torch.stack([o["pred_boxes"] for o in layers]).float()
        groups = self.query_groups  # addition 4: the queries are that many groups (1 in the paper)
        if num_boxes is None:
            num_boxes = sum(len(t["labels"]) for t in targets)
        num_boxes = torch.as_tensor(num_boxes, dtype=torch.float32, device=logits.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(num_boxes)
            num_boxes /= dist.get_world_size()
        num_boxes = num_boxes.clamp(min=1)
        if class_weight_sum is None:
            class_weight_sum = cross_entropy_normaliser(targets, logits.shape[2] // groups, self.eos_coef)
        decoder = {"pred_logits": logits, "pred_boxes": boxes}
        if "enc_outputs" in outputs:  # addition 2: the proposals are matched too, in the same copy to the host
            proposals = proposal_set(outputs["enc_outputs"])
            indices, enc_indices = self.matcher.match_sets([(decoder, groups), (proposals, 1)], targets)
        else:
            indices = self.matcher(decoder, targets, groups)
        sigmoid = self.cls_loss != "ce"  # addition 6: every sigmoid weighs 1, the class loss is a sum over num_boxes
        ce, l1, giou = summed_losses(logits, boxes, targets, indices, 1.0 if sigmoid else self.eos_coef, self.cls_loss)  # (L,) each
        class_weight_sum = num_boxes if sigmoid else class_weight_sum
        terms = {"": (ce / (groups * class_weight_sum), l1 / (groups * num_boxes), giou / (groups * num_boxes))}
        if "enc_outputs" in outputs:  # addition 2
            terms["_enc"] = proposal_losses(proposals, targets, enc_indices, num_boxes, self.cls_loss)
        if "dn_outputs" in outputs:  # addition 3
            terms["_dn"] = denoising_losses(outputs["dn_outputs"], targets, num_boxes, self.cls_loss)

        total = sum((self.weight_ce * ce + self.weight_bbox * l1 + self.weight_giou * giou).sum()
                    for ce, l1, giou in terms.values())
        losses = {"loss": total}
        for term, (loss_ce, loss_bbox, loss_giou) in terms.items():
            last = len(loss_ce) - 1
            for layer in range(last + 1) if term == "" else [last]:  # the additions' earlier layers are not logged
                suffix = term if layer == last else f"{term}_{layer}"
                losses.update({"loss_ce" + suffix: loss_ce[layer], "loss_bbox" + suffix: loss_bbox[layer],
                               "loss_giou" + suffix: loss_giou[layer]})
        return losses


def cross_entropy_normaliser(targets, num_queries, eos_coef):
    """The sum of the cross-entropy's class weights over num_queries queries an image (one group): 1 for
    each matched query, eos_coef for each "no object". The loop computes it once over a whole accumulated batch."""
    matched = sum(min(len(t["labels"]), num_queries) for t in targets)
    return matched + eos_coef * (len(targets) * num_queries - matched)


def summed_losses(logits, boxes, targets, indices, no_object_weight, cls_loss="ce"):
    """Per layer (L,): the cross-entropy summed over every query (the unmatched ones target "no
    object", weighted by no_object_weight), and L1 and GIoU summed over the matched pairs.
    logits (L, B, Q, K+1), boxes (L, B, Q, 4); indices: per layer, per image, a (pred_idx, tgt_idx)
    pair. no_object_weight: eos_coef, or (B, Q) the additions' own weight of each query (0 for padding).
    A sigmoid cls_loss (addition 6) takes the cross-entropy's place, logits (L, B, Q, K)."""
    L, B, Q = logits.shape[:3]
    no_object = logits.shape[-1] - (cls_loss == "ce")  # the class index K: "no object"
    # which (layer, image, query) is matched to which of the batch's targets: built on the host, one copy
    device = logits.device
    first = np.cumsum([0] + [len(t["labels"]) for t in targets]).tolist()  # each image's first target
    index = torch.cat([torch.stack([torch.full_like(p, layer), torch.full_like(p, b), p, j + first[b]])
                       for layer, per_image in enumerate(indices) for b, (p, j) in enumerate(per_image)], dim=1)
    index = (index.pin_memory() if device.type == "cuda" else index).to(device, non_blocking=True)
    layer_idx, image_idx, query_idx, target_idx = index  # (M,) each
    tgt_labels = torch.cat([t["labels"] for t in targets]).to(device)[target_idx]
    tgt_boxes = torch.cat([t["boxes"] for t in targets]).to(device)[target_idx]

    src_boxes = boxes[layer_idx, image_idx, query_idx]  # (M, 4)
    src_xyxy, tgt_xyxy = box_convert(src_boxes, "cxcywh", "xyxy"), box_convert(tgt_boxes.float(), "cxcywh", "xyxy")
    target_classes = torch.full((L, B, Q), no_object, dtype=torch.int64, device=device)
    target_classes[layer_idx, image_idx, query_idx] = tgt_labels
    if cls_loss == "ce":
        ce = F.cross_entropy(logits.flatten(0, 2), target_classes.flatten(), reduction="none").view(L, B, Q)
    else:  # addition 6: iou_aware's target is each matched query's IoU with its object (one per pair, not all pairs)
        iou = None if cls_loss == "focal" else torch.zeros(L, B, Q, device=device).index_put(
            (layer_idx, image_idx, query_idx), paired_iou(src_xyxy, tgt_xyxy))
        ce = sigmoid_class_loss(logits, target_classes, iou, cls_loss)
    if torch.is_tensor(no_object_weight):
        no_object_weight = no_object_weight.to(ce.dtype)
    ce = ce * torch.where(target_classes == no_object, no_object_weight, 1.0)

    l1 = F.l1_loss(src_boxes, tgt_boxes.float(), reduction="none").sum(1)  # (M,)
    giou = generalized_box_iou_loss(src_xyxy, tgt_xyxy)
    zeros = torch.zeros(L, device=device)
    return ce.view(L, -1).sum(1), zeros.index_add(0, layer_idx, l1), zeros.index_add(0, layer_idx, giou)


# -----------------------------------------------------------------------------
# Addition 2's loss: encoder proposals (detr.py, "Addition 2")
# Each term is a sum divided by num_boxes, as the set loss's boxes are, so that gradient
# accumulation stays exact and no term grows with the image. Every token that no object is matched
# to is trained to say "no object". Summed over the tokens that background would grow with the
# image (64 tokens at 64 px and stride 8, ~850 at 800 px and stride 32) and drown the objects;
# Deformable DETR and DINO tame it with the sigmoid focal loss. Here an image's background tokens
# together weigh a fixed multiple of its objects at any size, and padding weighs nothing: measured
# against the focal loss (EXPERIMENTS.md), this keeps the dense signal that lets a backbone trained
# from scratch leave DETR's plateau.
PROPOSAL_BACKGROUND_WEIGHT = 2.0  # an image's background tokens weigh as this many of its objects (2 to 8 alike, EXPERIMENTS.md)


def proposal_background_weight(targets, valid):
    """(B, hw) the weight of each token's "no object" cross-entropy: an image's background tokens
    together weigh PROPOSAL_BACKGROUND_WEIGHT times its objects (at least one), padding nothing."""
    objects = torch.tensor([len(t["labels"]) for t in targets], device=valid.device)
    background = (valid.sum(1) - objects).clamp(min=1)  # the tokens that no object is matched to
    return valid * (PROPOSAL_BACKGROUND_WEIGHT * objects.clamp(min=1) / background)[:, None]


def proposal_set(enc_outputs):
    """The encoder proposals as the matcher takes them: every valid token is a query, one layer."""
    return {"pred_logits": enc_outputs["pred_logits"][None].float(), "pred_boxes": enc_outputs["pred_boxes"][None].float(),
            "valid": enc_outputs["valid"]}


def proposal_losses(proposals, targets, indices, num_boxes, cls_loss="ce"):
    """Every token matched to an object learns its class and box; the others say "no object", an
    image's background tokens together weighing a fixed multiple of its objects, padding nothing (a sigmoid
    cls_loss: every real token weighs 1, as in Deformable DETR; EXPERIMENTS.md). proposals: as proposal_set gives them."""
    valid = proposals["valid"]
    weight = proposal_background_weight(targets, valid) if cls_loss == "ce" else valid.float()
    sums = summed_losses(proposals["pred_logits"], proposals["pred_boxes"], targets, indices, weight, cls_loss)
    return tuple(s / num_boxes for s in sums)


# -----------------------------------------------------------------------------
# Addition 3's loss: denoising queries (detr.py, "Addition 3")


def denoising_pairs(targets, groups, n):
    """Per image, (query_idx, tgt_idx): denoising query g * n + j is the noised copy of target j."""
    return [(torch.cat([torch.arange(len(t["labels"])) + g * n for g in range(groups)]),
             torch.arange(len(t["labels"])).repeat(groups)) for t in targets]


def denoising_losses(dn_outputs, targets, num_boxes, cls_loss="ce"):
    """Denoising query g * n + j reconstructs target j at every decoder layer, with no matching;
    padded queries are in no loss. Averaged over the groups. With dn_contrastive (addition 8) a group's
    second half are its negatives: each real one says "no object", weighing as a positive, with no box loss."""
    logits, boxes = dn_outputs["pred_logits"].float(), dn_outputs["pred_boxes"].float()  # (L, B, groups * n, ...)
    L, B, D = logits.shape[:3]
    groups = dn_outputs["groups"]
    no_object_weight = torch.zeros(B, D, device=logits.device)  # every real positive is matched: the rest, padding, weighs 0
    pairs = denoising_pairs(targets, groups, D // groups)
    for b, (query_idx, _) in enumerate(pairs if dn_outputs["contrastive"] else []):  # addition 8: the real negatives
        no_object_weight[b, (query_idx + D // groups // 2).to(logits.device)] = 1.0
    sums = summed_losses(logits, boxes, targets, [pairs] * L, no_object_weight, cls_loss)
    return tuple(s / (groups * num_boxes) for s in sums)


# -----------------------------------------------------------------------------
# Addition 6's loss: sigmoid class losses (cls_loss; detr.py, "Addition 6")
# Each of a query's K classes is its own binary target; summed over queries and classes and divided
# by num_boxes (Deformable DETR), with no eos_coef: the focal weight keeps background from drowning objects.
# - 'focal' (Lin et al. 2017; Deformable DETR, DINO): a matched query's class targets 1, the rest 0,
#   each term weighed by how wrong it is, |p - t|^gamma.
# - 'iou_aware' (DEIM's matchability-aware loss, Huang et al. 2025, §3.2): the matched class targets the
#   box's IoU^gamma with its object, so the score ranks boxes by quality; negatives weigh p^gamma.
# Both match with Deformable DETR's focal cost.
FOCAL_ALPHA = 0.25  # the positives' share of the focal loss (focal loss §3.2; Deformable DETR, DINO)
FOCAL_GAMMA = 2.0  # the focal loss's exponent (and the focal matching cost's)
IOU_AWARE_GAMMA = 1.5  # iou_aware: the target IoU^gamma and the negatives' weight p^gamma (DEIM: 1.5)


def sigmoid_class_loss(logits, target_classes, iou, cls_loss):
    """(L, B, Q) the sigmoid class loss of each query, summed over its K classes. logits (L, B, Q, K);
    target_classes (L, B, Q): a class, or K for "no object"; iou (L, B, Q): the matched queries' box IoU."""
    logits = logits.float()
    onehot = F.one_hot(target_classes, logits.shape[-1] + 1)[..., :-1].to(logits.dtype)  # (L, B, Q, K); "no object": all 0
    prob = logits.sigmoid()
    if cls_loss == "focal":
        target = onehot
        weight = (FOCAL_ALPHA * target + (1 - FOCAL_ALPHA) * (1 - target)) * (prob - target).abs().pow(FOCAL_GAMMA)
    else:  # iou_aware
        target = onehot * iou.detach()[..., None].pow(IOU_AWARE_GAMMA)
        weight = onehot + (1 - onehot) * prob.detach().pow(IOU_AWARE_GAMMA)
    return (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * weight).sum(-1)


def focal_matching_cost(logits, tgt_labels):
    """(N, T) the focal loss's class cost (Deformable DETR's matcher): for each prediction's sigmoid
    score of each target's class, the positive focal term less the negative one. logits (N, K)."""
    prob = logits.sigmoid()[:, tgt_labels]  # (N, T)
    positive = FOCAL_ALPHA * (1 - prob).pow(FOCAL_GAMMA) * -(prob + 1e-8).log()
    negative = (1 - FOCAL_ALPHA) * prob.pow(FOCAL_GAMMA) * -(1 - prob + 1e-8).log()
    return positive - negative


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
    return check_config(config)


def check_config(c):
    """One error line for the first value out of its range (the types are already right): the training
    keys' rules here, then the model's, which detr.argument_problem holds for DETR and this config alike."""
    def positive_ints(v):
        return len(v) > 0 and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v)

    rules = [
        *((k, c[k] >= 1, ">= 1") for k in ("batch_size", "gradient_accumulation_steps", "max_iters", "eval_interval",
                                           "log_interval", "val_scale", "pad_to", "ema_warmup_iters", "max_dets")),
        *((k, c[k] >= 0, ">= 0") for k in ("num_workers", "warmup_iters", "lr_drop")),
        *((k, math.isfinite(c[k]) and c[k] >= 0, "a number >= 0") for k in (
            "learning_rate", "lr_backbone", "weight_decay", "grad_clip", "cost_class", "cost_bbox", "cost_giou")),
        ("eos_coef", 0 < c["eos_coef"] <= 1, "in (0, 1]"),
        ("ema_decay", 0 <= c["ema_decay"] < 1, "in [0, 1) (0: no EMA)"),
        ("lr_schedule", c["lr_schedule"] in ("step", "cosine"), "'step' or 'cosine'"),
        *((k, 0 <= c[k] <= 1, "in [0, 1]") for k in ("min_lr_ratio", "mosaic_prob", "mosaic_until")),
        ("tensorboard", not c["tensorboard"] or find_spec("tensorboard") is not None,
         "False without the tensorboard package (pip install tensorboard)"),
        ("train_scales", positive_ints(c["train_scales"]), "a list of sizes > 0"),
        ("crop_scales", positive_ints(c["crop_scales"]), "a list of sizes > 0"),
        ("crop_size", len(c["crop_size"]) == 2 and positive_ints(c["crop_size"]) and c["crop_size"][0] <= c["crop_size"][1],
         "(min, max) sizes with 0 < min <= max"),
        ("max_size", positive_ints(c["train_scales"]) and c["max_size"] > max([*c["train_scales"], c["val_scale"]]),
         "larger than every train_scale and val_scale"),
        ("dtype", c["dtype"] in ("float32", "bfloat16", "float16"), "float32, bfloat16 or float16"),
        ("best_metric", c["best_metric"] in ("mAP50", "mAP50_07", "mAP", "mAP75"), "mAP50, mAP50_07, mAP or mAP75"),
        ("dataset", c["dataset"] != "", "a prepared dataset's name or folder"),
        ("device", device_problem(c["device"]) is None, "cpu, or cuda on a machine with a GPU"),
    ]
    problem = next(((key, want) for key, ok, want in rules if not ok), None) or argument_problem(c)
    if problem:
        raise SystemExit(f"error: {problem[0]}={c[problem[0]]!r} must be {problem[1]}")
    return c


def new_criterion(config, query_groups):
    """The set loss with the config's costs, which are also the loss weights (paper App. A.1)."""
    matcher = HungarianMatcher(config["cost_class"], config["cost_bbox"], config["cost_giou"], config["cls_loss"] != "ce")
    return SetCriterion(matcher, config["eos_coef"], 1.0, config["cost_bbox"], config["cost_giou"], query_groups, config["cls_loss"])


def lr_factor(it, cfg):
    """Linear warm-up, then the paper's single step drop by 10x at lr_drop, or a cosine from 1 to
    min_lr_ratio at max_iters (lr_schedule='cosine', as most of DETR's successors)."""
    if it < cfg.warmup_iters:
        return (it + 1) / cfg.warmup_iters
    if cfg.lr_schedule == "cosine":
        progress = (it - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * (1 + math.cos(math.pi * progress)) / 2
    return 0.1 if it >= cfg.lr_drop else 1.0


@torch.no_grad()
def ema_update(ema_model, model, decay):
    """ema = decay * ema + (1 - decay) * model for every parameter and floating buffer (BatchNorm's
    statistics too); other buffers are copied. After each optimizer step (RT-DETR's ModelEMA)."""
    for averaged, current in zip(ema_model.state_dict().values(), model.state_dict().values()):
        if averaged.dtype.is_floating_point:
            averaged.mul_(decay).add_(current, alpha=1 - decay)
        else:
            averaged.copy_(current)


@torch.no_grad()
def training_diagnostics(model, outputs, targets, matcher):
    """What shows DETR's early plateau (logged every log_interval, drawn by tools/analyses.py --log):
    grad_norm_<part> and weight_norm_<part> for each part of the model (detr.parameters_by_part), the
    gradient before clipping, and how alike the queries are and how close their boxes get to the objects
    at each decoder layer (metrics.query_diagnostics: the last layer's matching of the first query group,
    and the denoising queries with the objects they copy)."""
    record = {}
    for name, params in parameters_by_part(model).items():
        grads = [p.grad.float().norm() for p in params if p.grad is not None]
        record[f"grad_norm_{name}"] = torch.stack(grads).norm().item() if grads else 0.0
        record[f"weight_norm_{name}"] = torch.stack([p.float().norm() for p in params]).norm().item()
    Q = model.num_queries
    matched = matcher({"pred_logits": outputs["pred_logits"][:, :Q], "pred_boxes": outputs["pred_boxes"][:, :Q]}, targets)
    dn = outputs.get("dn_outputs")
    dn_pairs = dn and denoising_pairs(targets, dn["groups"], dn["pred_boxes"].shape[2] // dn["groups"])
    return {**record, **query_diagnostics(outputs, targets, Q, matched, dn_pairs, model.sigmoid_classes)}


# -----------------------------------------------------------------------------
# the run's parts around the step: its setup, checkpoints, evaluations and log


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


def resume(run, checkpoint):
    """A checkpoint's optimizer, scaler, EMA and RNG states into the run, at the config's learning rates (a
    resume may change them on purpose), and one line that says where it goes on from."""
    cfg, changed = run.cfg, []
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    for group, key in zip(run.optimizer.param_groups, ("learning_rate", "lr_backbone")):
        if group["base_lr"] != getattr(cfg, key):
            changed.append(f"{key} {group['base_lr']:g} -> {getattr(cfg, key):g}")
            group["base_lr"] = getattr(cfg, key)
    if run.master:
        best = f"best val {cfg.best_metric} {run.best_val:.4f}" if run.best_val > -math.inf else "no evaluation yet"
        print(f"init_from=resume: {run.ckpt_path} at iteration {run.iter_num}, {best}" + (f"; {', '.join(changed)}" if changed else ""))
    if checkpoint.get("scaler"):
        run.scaler.load_state_dict(checkpoint["scaler"])
    if run.ema_model is not None and "ema_model" in checkpoint:
        run.ema_model.load_state_dict(checkpoint["ema_model"])
    rng = checkpoint["rng"]  # this process's own states
    torch.set_rng_state(rng["cpu"][run.rank % len(rng["cpu"])])
    if "cuda" in run.device and rng["cuda"]:
        torch.cuda.set_rng_state(rng["cuda"][run.rank % len(rng["cuda"])])


def describe(run, train_set, val_set):
    """The master's first lines: the data, the model and the machine, and a warning for each setting that
    leaves objects uncounted."""
    cfg = run.cfg
    n_params = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    print(f"{cfg.dataset}: {len(train_set) if train_set else 0} train / {len(val_set)} val images, {len(val_set.classes)} "
          f"classes; model {n_params / 1e6:.2f}M trainable parameters; {run.device}, {cfg.dtype}, world size {run.world_size}")
    if cfg.num_queries > cfg.max_dets:
        print(f"warning: num_queries={cfg.num_queries} but max_dets={cfg.max_dets}: COCO's mAP counts only the "
              f"{cfg.max_dets} best detections of an image and class (raise max_dets to count them all)")
    for warning in filter(None, (too_many_objects(d, cfg.num_queries) for d in (train_set, val_set) if d)):
        print(warning)


def set_loss(criterion, outputs, targets, num_boxes, class_weight_sum):
    """The criterion's losses; where the matcher finds non-finite outputs, a NaN loss through every output
    instead, so that DDP's backward still meets the other ranks' and every rank stops at the next check."""
    try:
        return criterion(outputs, targets, num_boxes, class_weight_sum)
    except FloatingPointError:
        total = sum(t.float().sum() for t in torch.utils._pytree.tree_leaves(outputs) if torch.is_tensor(t) and t.requires_grad)
        return {"loss": total * math.nan}


def save(run, best=False, evaluation_due=False):
    """ckpt.pt (and best.pt), written by the master, with every process's RNG states (a resumed DDP run
    draws the same dropout masks); evaluation_due: a signal cut the evaluation at this step short."""
    rng = {"cpu": gather(torch.get_rng_state(), run.world_size),
           "cuda": gather(torch.cuda.get_rng_state(), run.world_size) if "cuda" in run.device else []}
    ckpt = {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(), "model_args": run.model.config,
            "iter_num": run.iter_num, "best_val": run.best_val, "best_iter": run.best_iter, "config": run.config, "classes": run.model.classes,
            "rng": rng, "cpu_threads": torch.get_num_threads(), "category_ids": run.category_ids, "scaler": run.scaler.state_dict(),
            "evaluation_due": evaluation_due,
            **({"ema_model": run.ema_model.state_dict()} if run.ema_model is not None else {})}

    def write():
        save_checkpoint(ckpt, run.ckpt_path)
        if best:
            save_checkpoint(ckpt, os.path.join(run.cfg.out_dir, "best.pt"))

    on_master(write, run.ddp, run.master, run.device)
    run.checkpoint_iter, run.t_checkpoint = run.iter_num, time.time()


def evaluation_owed(run):
    """At an evaluation point (every eval_interval, and the end) not yet evaluated, or a resume whose
    evaluation a signal cut short."""
    n = run.iter_num
    return run.evaluation_due or ((n % run.cfg.eval_interval == 0 or n == run.cfg.max_iters) and run.checkpoint_iter != n)


def evaluate_and_save(run, eval_model, val_set, signals):
    """The val metrics, printed and logged, then ckpt.pt, and best.pt when best_metric improved. None when a
    signal stopped the evaluation (the checkpoint written at the stop asks the resume to evaluate first)."""
    same_on_every_rank(eval_model, run.ddp)
    result = evaluate(eval_model, val_set, run.cfg, run.device, run.rank, run.world_size, stop=lambda: bool(signals))
    if result is None:
        return None
    metrics = {f"val_{k}": v for k, v in result.items()}
    improved = metrics[f"val_{run.cfg.best_metric}"] > run.best_val
    run.best_val = max(run.best_val, metrics[f"val_{run.cfg.best_metric}"])
    if improved:
        run.best_iter = run.iter_num
    if run.master:
        limit = f" (at most {run.cfg.max_dets} detections an image and class)" if run.cfg.num_queries > run.cfg.max_dets else ""
        aps = ", ".join(f"{c} {ap:.3f}" for c, ap in zip(val_set.classes, metrics["val_AP50_per_class"]) if ap == ap)
        tqdm.write(f"iter {run.iter_num}: val mAP50 {metrics['val_mAP50']:.4f}, mAP50 (VOC07) {metrics['val_mAP50_07']:.4f}, "
                   f"mAP {metrics['val_mAP']:.4f}{limit} | AP50 {aps}")
    record = {"iter": run.iter_num, "time": round(time.time() - run.t_start, 1), **metrics}
    on_master(lambda: append_log(run.cfg.out_dir, record, run.writer, val_set.classes), run.ddp, run.master, run.device)
    save(run, improved)
    run.evaluation_due, run.t_log = False, time.time()  # the next record's img_per_s counts training alone
    return metrics


def log_losses(run, sums, steps, images, skipped_steps, diagnostics, progress):
    """The losses averaged over the steps since the last record (and the diagnostics at log_interval):
    printed and appended to log.jsonl by the master."""
    record = None
    if run.master:
        seconds = time.time() - run.t_log
        record = {"iter": run.iter_num, "time": round(time.time() - run.t_start, 1), **{k: v.item() / steps for k, v in sums.items()},
                  "lr": run.optimizer.param_groups[0]["lr"], "img_per_s": images / seconds,
                  **({"skipped_steps": skipped_steps} if run.scaler.is_enabled() else {}), **diagnostics}
        progress.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.1e}", img_s=f"{record['img_per_s']:.1f}")
        tqdm.write(f"iter {run.iter_num}: " + ", ".join(f"{k} {record[k]:.4f}" for k in ("loss", "loss_ce", "loss_bbox", "loss_giou"))
                   + f", lr {record['lr']:.1e}, {record['img_per_s']:.1f} img/s")
        warning = None if run.plateau_said else plateau_warning(record, run.cfg.warmup_iters)
        if warning:  # once a run
            tqdm.write(warning)
            run.plateau_said = True
    on_master(lambda: append_log(run.cfg.out_dir, record, run.writer), run.ddp, run.master, run.device)
    run.t_log = time.time()


def stop_or_checkpoint(run, signals):
    """(stop, due): a signal on any rank stops every rank after the same step; ckpt.pt is due on the
    master's clock (checkpoint_minutes; an evaluation point writes it anyway)."""
    cfg = run.cfg
    stop = bool(signals)
    due = cfg.checkpoint_minutes > 0 and time.time() - run.t_checkpoint > 60 * cfg.checkpoint_minutes
    if run.ddp:
        flags = torch.tensor([stop, due and run.master], dtype=torch.int32, device=run.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        stop, due = bool(flags[0]), bool(flags[1])
    return stop, due and not stop and not evaluation_owed(run)


# -----------------------------------------------------------------------------
# training


def train(config):
    """Run training with a config dict (get_config's); returns the model and its last validation metrics."""
    cfg = SimpleNamespace(**config)
    ddp, rank, world_size, device = setup_process(cfg)
    master = rank == 0
    if not cfg.eval_only:
        check_out_dir(cfg, master)
    torch.manual_seed(cfg.seed + rank)
    if "cuda" in device:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    train_set, val_set = load_datasets(cfg)
    model, checkpoint = initial_model(cfg, config, val_set.classes)
    if device == "cpu" and not ddp:  # a thread per free core; a resume keeps its run's (other counts sum in another order)
        torch.set_num_threads((checkpoint or {}).get("cpu_threads") or cpu_threads())
    model.classes = val_set.classes
    model.to(device)
    if "cuda" in device:  # NHWC convolutions run on tensor cores without layout transposes
        model.backbone.to(memory_format=torch.channels_last)
    optimizer, scaler = new_optimizer(model, cfg, device)
    # the EMA of the weights (RT-DETR), which evaluation and best.pt use; a new one starts from the weights
    ema_model = copy.deepcopy(model).eval().requires_grad_(False) if cfg.ema_decay > 0 else None
    run = SimpleNamespace(  # what the parts above take: the run's state
        cfg=cfg, config=config, ddp=ddp, rank=rank, world_size=world_size, device=device, master=master, model=model,
        optimizer=optimizer, scaler=scaler, ema_model=ema_model, category_ids=val_set.category_ids,
        ckpt_path=os.path.join(cfg.out_dir, "ckpt.pt"), writer=None, iter_num=checkpoint["iter_num"] if checkpoint else 0,
        best_val=checkpoint["best_val"] if checkpoint else -math.inf, best_iter=checkpoint.get("best_iter", 0) if checkpoint else 0,
        evaluation_due=bool(checkpoint and checkpoint.get("evaluation_due")), plateau_said=False)
    if checkpoint is not None:
        resume(run, checkpoint)
    if cfg.compile:
        compile_model(model)
    eval_model = ema_model or model  # not the DDP wrapper: its forward is a collective, and shards may differ by a batch
    if ddp:
        model = DDP(model, device_ids=[device] if "cuda" in device else None)
        if ema_model is not None:
            same_on_every_rank(ema_model, ddp)  # DDP gave every rank rank 0's weights: the EMA starts from them too
    raw_model = run.model
    criterion = new_criterion(config, raw_model.query_groups).to(device)
    if master:
        describe(run, train_set, val_set)
    if cfg.eval_only:
        same_on_every_rank(eval_model, ddp)
        metrics = evaluate(eval_model, val_set, cfg, device, rank, world_size)
        if master:
            print(json.dumps(metrics))
        return raw_model, metrics
    if checkpoint is not None and master:
        cut_log(cfg.out_dir, run.iter_num)
    if cfg.tensorboard and master:
        from torch.utils.tensorboard import SummaryWriter  # optional: imported only when asked for

        run.writer = SummaryWriter(os.path.join(cfg.out_dir, "tensorboard"))
    batches = training_batches(train_set, cfg, run.iter_num * cfg.batch_size * cfg.gradient_accumulation_steps,
                               run.rank, run.world_size, pin_memory="cuda" in device)

    metrics, sums, steps_since_log, images_since_log, skipped_steps = {}, {}, 0, 0, 0
    first_bad_iter = torch.tensor(NONE_BAD, device=device)  # where a loss first went non-finite, kept on the device
    run.t_start = run.t_log = run.t_checkpoint = time.time()  # the clock of checkpoint_minutes starts at the (re)start
    start_iter, run.checkpoint_iter, stop, images = run.iter_num, run.iter_num, False, None
    if cfg.compile and master:
        tqdm.write("compiling the backbone and the transformer layers (compile_model): the first step takes longer")
    with stop_signals() as signals, tqdm(total=cfg.max_iters, initial=run.iter_num, disable=not master, dynamic_ncols=True) as progress:
        try:
            while True:
                if evaluation_owed(run) and not stop:
                    result = evaluate_and_save(run, eval_model, val_set, signals)
                    stop, metrics = result is None, result or metrics  # None: a signal stopped it
                if run.iter_num >= cfg.max_iters or stop:
                    break

                # one optimizer step: gradient_accumulation_steps micro-batches, normalised as one batch
                for group in optimizer.param_groups:
                    group["lr"] = group["base_lr"] * lr_factor(run.iter_num, cfg)
                micro_batches = [next(batches) for _ in range(cfg.gradient_accumulation_steps)]
                all_targets = [t for _, _, targets in micro_batches for t in targets]
                num_boxes = sum(len(t["labels"]) for t in all_targets)  # local: the criterion averages it over processes
                class_weight_sum = cross_entropy_normaliser(all_targets, raw_model.num_queries, cfg.eos_coef)
                for micro_step, batch in enumerate(micro_batches):
                    images, mask, targets = to_device(*batch, device)
                    last_micro_step = micro_step == cfg.gradient_accumulation_steps - 1
                    with model.no_sync() if ddp and not last_micro_step else nullcontext():  # all-reduce grads once
                        with autocast(device, cfg.dtype):  # the targets only feed denoising queries
                            outputs = model(images, mask, targets if raw_model.denoising_groups else None)
                        losses = set_loss(criterion, outputs, targets, num_boxes, class_weight_sum)
                        scaler.scale(losses["loss"]).backward()
                    for k, v in losses.items():
                        sums[k] = sums.get(k, 0.0) + v.detach()
                    first_bad_iter = torch.where(torch.isfinite(losses["loss"].detach()), first_bad_iter,
                                                 first_bad_iter.clamp(max=run.iter_num))
                scaler.unscale_(optimizer)  # float16: clipping and the logged norms see the true gradients
                # the diagnostics before clipping: what the loss asks of each part
                log_now = master and (run.iter_num + 1) % cfg.log_interval == 0 and torch.isfinite(losses["loss"])
                diagnostics = training_diagnostics(raw_model, outputs, targets, criterion.matcher) if log_now else {}
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
                scale = scaler.get_scale() if scaler.is_enabled() else None  # a host sync: float16 only
                scaler.step(optimizer)  # without float16, optimizer.step()
                scaler.update()
                if scale is not None:
                    skipped_steps += scaler.get_scale() < scale  # the scale drops when the gradients overflowed
                optimizer.zero_grad(set_to_none=True)
                if cfg.compile and master and run.iter_num == start_iter:
                    tqdm.write(f"compiled: the first step took {time.time() - run.t_start:.0f} s")
                run.iter_num, steps_since_log = run.iter_num + 1, steps_since_log + 1
                progress.update()
                if ema_model is not None:
                    ema_update(ema_model, raw_model, cfg.ema_decay * (1 - math.exp(-run.iter_num / cfg.ema_warmup_iters)))
                images_since_log += len(all_targets) * world_size

                if run.iter_num % cfg.log_interval == 0 or evaluation_owed(run):
                    stop_if_not_finite(first_bad_iter, ddp, master, run.ckpt_path)  # before anything is logged or saved
                    log_losses(run, sums, steps_since_log, images_since_log, skipped_steps, diagnostics, progress)
                    sums, steps_since_log, images_since_log, skipped_steps = {}, 0, 0, 0
                stop, due = stop_or_checkpoint(run, signals)
                if due:
                    stop_if_not_finite(first_bad_iter, ddp, master, run.ckpt_path)
                    save(run)
        except RuntimeError as e:  # out of memory in a training step: torch's, or the CPU allocator's
            if not is_out_of_memory(e):
                raise
            raise out_of_memory(run.iter_num, images, cfg, device, run.ckpt_path) from None
        if stop:  # pre-empted: ckpt.pt at this step, unless an evaluation has just written it
            if run.checkpoint_iter != run.iter_num or evaluation_owed(run):
                stop_if_not_finite(first_bad_iter, ddp, master, run.ckpt_path)
                save(run, evaluation_due=evaluation_owed(run))
            if master:
                tqdm.write(f"{signals[0] if signals else 'a signal on another rank'}: stopped at iteration {run.iter_num}; "
                           f"{run.ckpt_path} written, resume with --init_from=resume")
    if master and not stop:  # the run's end: what it reached, and what to do with it
        best = os.path.join(cfg.out_dir, "best.pt")
        print(f"done: best val {cfg.best_metric} {run.best_val:.4f} at iteration {run.best_iter}, in {best}. Next: "
              f"python sample.py --ckpt={best} (its detections drawn), python tools/eval.py --ckpt={best} (the report)")
    if run.writer is not None:
        run.writer.close()
    if ddp:
        dist.destroy_process_group()
    if signals and signals[0] == "SIGINT":
        raise SystemExit(130)  # Ctrl-C: the shell's status for an interrupted command, so that `train.py && ...` stops
    return raw_model, metrics


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
        if "RANK" not in os.environ or not (isinstance(e, dist.DistError) or "by peer" in str(e)):  # gloo: closed, reset
            raise
        raise SystemExit(f"error: rank {os.environ['RANK']} stopped: another rank of the run did ({type(e).__name__})") from None
    finally:  # a run that failed before it wrote anything (no dataset, a failed download) leaves no empty folder
        if made_out_dir and os.path.isdir(made_out_dir) and not os.listdir(made_out_dir):
            os.rmdir(made_out_dir)
