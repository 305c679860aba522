"""
Train DETR on a prepared dataset (data/<name>/<split>.json, see data/*/prepare.py).

    python data/shapes/prepare.py && python train.py config/shapes.py      # CPU, minutes
    python train.py config/voc.py --batch_size=8 --compile=False           # one GPU
    torchrun --standalone --nproc_per_node=4 train.py config/voc.py        # DDP

Defaults sit below as globals; a config file (plain Python) overrides them, then --key=value.
The file goes in the order the data flows: dataset and augmentation, batching, Hungarian matcher
and set loss, mAP, and the training loop. Everything above `train()` is importable on its own.
"""

import ast
import json
import math
import os
import sys

import numpy as np
import torch
from PIL import Image
import torchvision.transforms.v2 as v2
from torchvision import tv_tensors
from torchvision.ops import box_convert, box_iou

# -----------------------------------------------------------------------------
# data: a prepared json (DESIGN §3) -> (image, target) pairs

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class RandomSizeCrop(v2.Transform):
    """Crop a window whose height and width are drawn uniformly from [min_size, max_size], within
    the image (the official DETR crop; torchvision has no twin of it)."""

    def __init__(self, min_size, max_size):
        super().__init__()
        self.min_size, self.max_size = min_size, max_size

    def make_params(self, flat_inputs):
        H, W = v2.query_size(flat_inputs)
        h = int(torch.randint(min(self.min_size, H), min(H, self.max_size) + 1, ()))
        w = int(torch.randint(min(self.min_size, W), min(W, self.max_size) + 1, ()))
        top, left = int(torch.randint(0, H - h + 1, ())), int(torch.randint(0, W - w + 1, ()))
        return dict(top=top, left=left, height=h, width=w)

    def transform(self, inpt, params):
        return self._call_kernel(v2.functional.crop, inpt, **params)


def make_transforms(train, scales, max_size, crop_scales, crop_size, val_scale):
    """The paper's augmentation (§4, App. A.4): horizontal flip, then the shorter side resized to one
    of `scales` (longer side <= max_size), or with probability 0.5 first resized to one of
    `crop_scales` and cropped to a random window of crop_size[0]..crop_size[1] pixels.
    Validation resizes the shorter side to val_scale. Boxes follow the image through every step."""
    normalize = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    if not train:
        return v2.Compose([v2.Resize(val_scale, max_size=max_size), normalize])
    resize = v2.RandomShortestSize(scales, max_size)
    crop_then_resize = v2.Compose([v2.RandomShortestSize(crop_scales), RandomSizeCrop(*crop_size), resize])
    return v2.Compose([
        v2.RandomHorizontalFlip(),
        v2.RandomChoice([resize, crop_then_resize]),
        v2.SanitizeBoundingBoxes(),  # drops boxes that the crop left with no area, and their labels
        normalize,
    ])


class DetectionDataset(torch.utils.data.Dataset):
    """Reads a prepared json. Returns (image (3, h, w) normalised float, target) with the target as
    DESIGN §2: labels (N,), boxes (N, 4) cxcywh in [0, 1] of the transformed image, plus
    image_id (the index in the json) and orig_size (H, W) for evaluation. Difficult objects are
    left out unless keep_difficult. An image that cannot be decoded is skipped with one logged
    line and the next one is returned, so a batch keeps its size."""

    def __init__(self, json_path, transform, keep_difficult=False):
        with open(json_path) as f:
            data = json.load(f)
        self.classes, self.records = data["classes"], data["images"]
        root = os.path.dirname(os.path.abspath(json_path))
        self.paths = [os.path.join(root, r["file"]) for r in self.records]  # join keeps absolute paths
        self.transform, self.keep_difficult = transform, keep_difficult
        self.unreadable = set()

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        for i in range(index, index + len(self)):
            i %= len(self)
            try:
                with Image.open(self.paths[i]) as im:
                    image = v2.functional.pil_to_tensor(im.convert("RGB"))  # (3, H, W) uint8
            except (OSError, SyntaxError, ValueError) as e:  # a truncated or corrupt file, or a missing one
                if i not in self.unreadable:
                    self.unreadable.add(i)
                    print(f"skip: cannot decode {self.paths[i]} ({type(e).__name__})", file=sys.stderr)
                continue
            return self.make_sample(i, image)
        raise RuntimeError(f"no image of {len(self)} could be decoded")

    def make_sample(self, i, image):
        record = self.records[i]
        boxes = torch.tensor(record["boxes"], dtype=torch.float32).reshape(-1, 4)  # xyxy pixels
        labels = torch.tensor(record["labels"], dtype=torch.int64)
        if not self.keep_difficult:
            keep = ~torch.tensor(record.get("difficult", [0] * len(labels)), dtype=torch.bool)
            boxes, labels = boxes[keep], labels[keep]
        H, W = image.shape[-2:]
        sample = self.transform({
            "image": tv_tensors.Image(image),
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(H, W)),
            "labels": labels,
        })
        image = sample["image"].as_subclass(torch.Tensor)
        h, w = image.shape[-2:]
        boxes = box_convert(sample["boxes"].as_subclass(torch.Tensor), "xyxy", "cxcywh")
        boxes = boxes / torch.tensor([w, h, w, h], dtype=torch.float32)
        target = {"labels": sample["labels"], "boxes": boxes, "image_id": i, "orig_size": torch.tensor([H, W])}
        return image, target


def collate(batch, pad_to=1):
    """Pad images bottom/right to the batch's largest size, rounded up to a multiple of pad_to (fixed
    multiples let torch.compile reuse kernels). Returns images (B, 3, H, W), mask (B, H, W) True on
    padding, or None when nothing is padded, and the list of targets."""
    images, targets = zip(*batch)
    H = math.ceil(max(im.shape[1] for im in images) / pad_to) * pad_to
    W = math.ceil(max(im.shape[2] for im in images) / pad_to) * pad_to
    padded = images[0].new_zeros(len(images), 3, H, W)
    mask = torch.ones(len(images), H, W, dtype=torch.bool)
    for im, pad, m in zip(images, padded, mask):
        pad[:, : im.shape[1], : im.shape[2]].copy_(im)
        m[: im.shape[1], : im.shape[2]] = False
    return padded, (mask if mask.any() else None), list(targets)


# -----------------------------------------------------------------------------
# metrics (DESIGN §4): Pascal VOC AP at IoU 0.5 (11-point and all-point) and COCO AP


def compute_map(detections, ground_truths, num_classes, max_dets=100):
    """detections: per image {boxes (M, 4) xyxy, scores (M,), labels (M,)};
    ground_truths: per image {boxes (N, 4) xyxy, labels (N,), difficult (N,) optional}.
    Returns mAP50_07 (VOC2007 11-point), mAP50 (VOC2010+ all-point), mAP (COCO, IoU 0.50:0.05:0.95,
    101-point, <= max_dets detections per image), mAP75, and AP_per_class (all-point at 0.5, NaN
    for classes with no ground truth, which are left out of every mean).

    Detections are matched greedily in order of score, as both reference evaluators do. The order
    only matters within an image, so all images are matched at once, one detection rank at a time.
    A detection matched to a difficult object is neither a true nor a false positive."""
    N = len(ground_truths)
    D = max([len(d["scores"]) for d in detections] + [1])
    G = max([len(g["labels"]) for g in ground_truths] + [1])
    ious = torch.full((N, D, G), -1.0)  # -1 where there is no such pair or the classes differ
    det_scores = torch.full((N, D), -math.inf)
    det_labels = torch.full((N, D), -1, dtype=torch.int64)
    gt_labels = torch.full((N, G), -1, dtype=torch.int64)
    gt_difficult = torch.zeros(N, G, dtype=torch.bool)
    for n, (det, gt) in enumerate(zip(detections, ground_truths)):
        order = torch.argsort(torch.as_tensor(det["scores"]), descending=True, stable=True)
        scores, labels = torch.as_tensor(det["scores"])[order], torch.as_tensor(det["labels"])[order]
        d, g = len(scores), len(gt["labels"])
        det_scores[n, :d], det_labels[n, :d] = scores.float(), labels
        gt_labels[n, :g] = torch.as_tensor(gt["labels"])
        if "difficult" in gt:
            gt_difficult[n, :g] = torch.as_tensor(gt["difficult"]).bool()
        if d and g:
            iou = box_iou(torch.as_tensor(det["boxes"])[order].float(), torch.as_tensor(gt["boxes"]).float())
            ious[n, :d, :g] = torch.where(labels[:, None] == gt_labels[n, None, :g], iou, -1.0)

    voc_tp, voc_ignored = match_voc(ious, gt_difficult, 0.5)  # (N, D)
    iou_thresholds = np.linspace(0.5, 0.95, 10)  # the exact values COCOeval uses
    coco_tp, coco_ignored = match_coco(ious, gt_difficult, torch.from_numpy(iou_thresholds).float(), max_dets)

    order = torch.argsort(det_scores.flatten(), descending=True, stable=True)  # all detections by score
    labels_sorted = det_labels.flatten()[order]
    voc_tp, voc_ignored = voc_tp.flatten()[order], voc_ignored.flatten()[order]
    coco_tp, coco_ignored = coco_tp.flatten(1)[:, order], coco_ignored.flatten(1)[:, order]
    ap50_07, ap50, ap_coco = (np.full(num_classes, np.nan) for _ in range(3))
    ap75 = np.full(num_classes, np.nan)
    for c in range(num_classes):
        num_gt = int(((gt_labels == c) & ~gt_difficult).sum())
        if num_gt == 0:
            continue
        mine = labels_sorted == c
        keep = ~voc_ignored[mine]
        precision, recall = precision_recall(voc_tp[mine][keep].numpy(), num_gt)
        ap50_07[c], ap50[c] = voc_ap_11_point(precision, recall), voc_ap_all_point(precision, recall)
        per_threshold = []
        for t in range(len(iou_thresholds)):
            keep = ~coco_ignored[t][mine]
            precision, recall = precision_recall(coco_tp[t][mine][keep].numpy(), num_gt)
            per_threshold.append(coco_ap(precision, recall))
        ap_coco[c], ap75[c] = np.mean(per_threshold), per_threshold[5]

    def mean(ap):
        return float(np.nanmean(ap)) if not np.isnan(ap).all() else math.nan

    return {"mAP50_07": mean(ap50_07), "mAP50": mean(ap50), "mAP": mean(ap_coco), "mAP75": mean(ap75),
            "AP_per_class": ap50.tolist()}


def match_voc(ious, gt_difficult, threshold):
    """The VOC devkit's rule: a detection takes the ground truth it overlaps most; above the
    threshold it is a true positive if that object is not yet taken, ignored if the object is
    difficult, and a false positive otherwise. ious (N, D, G), detections sorted by score."""
    N, D, G = ious.shape
    taken = torch.zeros(N, G, dtype=torch.bool)
    tp, ignored = torch.zeros(N, D, dtype=torch.bool), torch.zeros(N, D, dtype=torch.bool)
    for r in range(D):
        best, j = ious[:, r].max(-1)  # (N,)
        hit = best > threshold
        difficult = gt_difficult.gather(1, j[:, None])[:, 0]
        tp[:, r] = hit & ~difficult & ~taken.gather(1, j[:, None])[:, 0]
        ignored[:, r] = hit & difficult
        taken.scatter_(1, j[:, None], (taken.gather(1, j[:, None])[:, 0] | tp[:, r])[:, None])
    return tp, ignored


def match_coco(ious, gt_difficult, thresholds, max_dets):
    """COCOeval's rule, at every IoU threshold at once: a detection takes the best-overlapping object
    (IoU >= threshold) not yet taken, preferring real objects to ignored (difficult) ones; if it
    takes an ignored one it is ignored too. Only the top max_dets detections of an image count.
    Returns tp and ignored (T, N, D); detections past max_dets are ignored."""
    N, D, G = ious.shape
    T = len(thresholds)
    taken = torch.zeros(T, N, G, dtype=torch.bool)
    tp, ignored = torch.zeros(T, N, D, dtype=torch.bool), torch.ones(T, N, D, dtype=torch.bool)
    for r in range(min(D, max_dets)):
        iou = ious[None, :, r].expand(T, N, G)
        free = ~taken & (iou >= thresholds[:, None, None])  # (T, N, G)
        real, hard = free & ~gt_difficult, free & gt_difficult
        j_real = torch.where(real, iou, -2.0).argmax(-1)
        j_hard = torch.where(hard, iou, -2.0).argmax(-1)
        has_real, has_hard = real.any(-1), hard.any(-1)  # (T, N)
        j = torch.where(has_real, j_real, j_hard)
        tp[:, :, r] = has_real
        ignored[:, :, r] = ~has_real & has_hard
        taken.scatter_(2, j[..., None], taken.gather(2, j[..., None]) | (has_real | has_hard)[..., None])
    return tp, ignored


def precision_recall(tp, num_gt):
    """Cumulative precision and recall down a score-sorted list of true (1) / false (0) positives."""
    tp_cum = np.cumsum(tp, dtype=np.float64)
    fp_cum = np.cumsum(~tp, dtype=np.float64)
    return tp_cum / np.maximum(tp_cum + fp_cum, np.finfo(np.float64).eps), tp_cum / num_gt


def voc_ap_11_point(precision, recall):
    """VOC2007: mean of the best precision at recall >= 0, 0.1, ..., 1."""
    return float(np.mean([precision[recall >= t].max() if (recall >= t).any() else 0.0
                          for t in np.arange(0.0, 1.1, 0.1)]))


def voc_ap_all_point(precision, recall):
    """VOC2010+: area under the precision-recall curve made monotone (precision envelope)."""
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def coco_ap(precision, recall):
    """COCO: mean of the enveloped precision at recall 0, 0.01, ..., 1 (0 where never reached)."""
    envelope = np.append(np.maximum.accumulate(precision[::-1])[::-1], 0.0)  # last: never reached
    i = np.searchsorted(recall, np.linspace(0.0, 1.0, 101), side="left")  # len(recall) when never reached
    return float(envelope[i].mean())
