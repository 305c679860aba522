"""
Detection metrics, as the reference evaluators compute them, in pure torch/numpy (no model):
Pascal VOC AP at IoU 0.5 (the 11-point VOC2007 and all-point VOC2010+ rules, as the VOC devkit) and
COCO AP (IoU 0.50:0.05:0.95, 101 recall points, area ranges, as pycocotools' COCOeval), plus the
conversions between a dataset's records and what they read.

    from lib.metrics import compute_map
    compute_map(detections, ground_truths, num_classes)   # {'mAP50': ..., 'mAP': ..., ...}

train.py evaluates with it; tools/bench.py --what=map times it on 5,000 images. At the end: what the
training diagnostics measure of a model's outputs (query_diagnostics).
"""

import math

import numpy as np
import torch
from torchvision.ops import box_area, box_convert


# COCOeval's area ranges (pixels²), both ends included
AREA_RANGES = {"": (0.0, 1e10), "_small": (0.0, 32.0**2), "_medium": (32.0**2, 96.0**2), "_large": (96.0**2, 1e10)}


def compute_map(detections, ground_truths, num_classes, max_dets=100, details=False):
    """detections: per image {boxes (M, 4) xyxy, scores (M,), labels (M,)};
    ground_truths: per image {boxes (N, 4) xyxy, labels (N,), and optionally difficult (N,),
    iscrowd (N,) and area (N,) (COCO's object area; the box area if absent)}.
    Returns mAP50_07 (VOC2007 11-point), mAP50 (VOC2010+ all-point), mAP (COCO, IoU 0.50:0.05:0.95,
    101-point, <= max_dets detections per image and class, pycocotools' maxDets), mAP75, mAP_small /
    _medium / _large (COCO's area ranges), AR<max_dets> (COCO's mean recall, AR100 by default), and
    per class AP50_per_class (VOC's all-point AP at IoU 0.5) and AP_per_class (COCO's, 0.50:0.95).
    Classes with no ground truth are NaN and left out of every mean. With details (tools/eval.py's report), also
    per_class: {objects (the objects COCO counts), AP, AP50, AP75, AR<max_dets>} (COCO's, as pycocotools
    per class), and matches: per image, for each detection in the order given, the ground-truth object
    COCO's rule matched it to at IoU 0.5 (-1: none) and whether it is ignored (it matched a difficult
    object or a crowd, or lies beyond the top max_dets of its image and class).

    Detections are matched greedily in order of score, as both reference evaluators do. The order
    only matters within an image, so all images are matched at once, one detection rank at a time.
    A detection matched to a difficult object or to a crowd is neither a true nor a false positive;
    a crowd absorbs any number of them, and its IoU with a detection is their intersection over the
    detection's own area (COCOeval's rule)."""
    N = len(ground_truths)  # images; D and G: the most detections and ground-truth objects of one image
    D = max([len(d["scores"]) for d in detections] + [1])
    G = max([len(g["labels"]) for g in ground_truths] + [1])
    ious = torch.full((N, D, G), -1.0, dtype=torch.float64)  # -1 where there is no such pair or the classes differ
    det_scores = torch.full((N, D), -math.inf)
    det_labels = torch.full((N, D), -1, dtype=torch.int64)
    det_area = torch.zeros(N, D, dtype=torch.float64)
    det_counted = torch.zeros(N, D, dtype=torch.bool)  # within the top max_dets of its image and class
    gt_labels = torch.full((N, G), -1, dtype=torch.int64)
    gt_difficult = torch.zeros(N, G, dtype=torch.bool)
    gt_crowd = torch.zeros(N, G, dtype=torch.bool)
    gt_area = torch.zeros(N, G, dtype=torch.float64)
    orders = []  # per image: its detections by score
    for n, (det, gt) in enumerate(zip(detections, ground_truths)):
        order = torch.argsort(torch.as_tensor(det["scores"]), descending=True, stable=True)
        orders.append(order)
        scores, labels = torch.as_tensor(det["scores"])[order], torch.as_tensor(det["labels"])[order].long()
        boxes = torch.as_tensor(det["boxes"]).reshape(-1, 4)[order].double()
        gt_boxes = torch.as_tensor(gt["boxes"]).reshape(-1, 4).double()
        d, g = len(scores), len(gt["labels"])
        det_scores[n, :d], det_labels[n, :d] = scores.float(), labels
        det_area[n, :d] = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        det_counted[n, :d] = top_of_each_class(labels, max_dets)
        gt_labels[n, :g] = torch.as_tensor(gt["labels"])
        for flags, key in ((gt_difficult, "difficult"), (gt_crowd, "iscrowd")):
            if key in gt:
                flags[n, :g] = torch.as_tensor(gt[key]).bool()
        box_area = (gt_boxes[:, 2] - gt_boxes[:, 0]) * (gt_boxes[:, 3] - gt_boxes[:, 1])
        gt_area[n, :g] = torch.as_tensor(gt["area"]).double() if "area" in gt else box_area
        if d and g:
            top_left = torch.maximum(boxes[:, None, :2], gt_boxes[None, :, :2])
            bottom_right = torch.minimum(boxes[:, None, 2:], gt_boxes[None, :, 2:])
            inter = (bottom_right - top_left).clamp(min=0).prod(-1)  # (d, g)
            union = torch.where(gt_crowd[n, None, :g], det_area[n, :d, None], det_area[n, :d, None] + box_area - inter)
            iou = torch.where(union > 0, inter / union.clamp(min=1e-300), 0.0)
            ious[n, :d, :g] = torch.where(labels[:, None] == gt_labels[n, None, :g], iou, -1.0)

    voc_tp, voc_ignored = match_voc(ious, gt_difficult | gt_crowd, 0.5)  # (N, D)
    iou_thresholds = torch.from_numpy(np.linspace(0.5, 0.95, 10))  # the exact values COCOeval uses
    order = torch.argsort(det_scores.flatten(), descending=True, stable=True)  # all detections by score
    coco = {}  # area range -> ignored objects (N, G), and tp, ignored (T, N * D) in score order
    for name, (low, high) in AREA_RANGES.items():
        gt_ignored = gt_difficult | gt_crowd | (gt_area < low) | (gt_area > high)
        tp, ignored, matched = match_coco(ious, gt_ignored, gt_crowd, iou_thresholds, det_counted)
        if name == "" and details:  # back in each image's given order: o.argsort() inverts the sort
            matches = [(matched[0, n, :len(o)][o.argsort()], ignored[0, n, :len(o)][o.argsort()])
                       for n, o in enumerate(orders)]
        ignored |= ~tp & ((det_area < low) | (det_area > high))  # an unmatched detection outside the range
        coco[name] = gt_ignored, tp.flatten(1)[:, order], ignored.flatten(1)[:, order]
    labels_sorted = det_labels.flatten()[order]
    voc_tp, voc_ignored = voc_tp.flatten()[order], voc_ignored.flatten()[order]
    ap50_07, ap50, ap50_coco, ap75, ar100 = (np.full(num_classes, np.nan) for _ in range(5))
    objects = np.zeros(num_classes, dtype=np.int64)
    ap_coco = {name: np.full(num_classes, np.nan) for name in AREA_RANGES}
    for c in range(num_classes):
        mine = labels_sorted == c
        num_gt = int(((gt_labels == c) & ~gt_difficult & ~gt_crowd).sum())
        if num_gt:
            keep = ~voc_ignored[mine]
            precision, recall = precision_recall(voc_tp[mine][keep].numpy(), num_gt)
            ap50_07[c], ap50[c] = voc_ap_11_point(precision, recall), voc_ap_all_point(precision, recall)
        for name, (gt_ignored, tp, ignored) in coco.items():
            num_gt = int(((gt_labels == c) & ~gt_ignored).sum())
            if num_gt == 0:
                continue
            tp, ignored = tp[:, mine], ignored[:, mine]
            aps, recalls = [], []
            for t in range(len(iou_thresholds)):
                precision, recall = precision_recall(tp[t][~ignored[t]].numpy(), num_gt)
                aps.append(coco_ap(precision, recall))
                recalls.append(recall[-1] if len(recall) else 0.0)
            ap_coco[name][c] = np.mean(aps)
            if name == "":
                objects[c], ap50_coco[c], ap75[c], ar100[c] = num_gt, aps[0], aps[5], np.mean(recalls)

    def mean(ap):
        return float(np.nanmean(ap)) if not np.isnan(ap).all() else math.nan

    result = {"mAP50_07": mean(ap50_07), "mAP50": mean(ap50), "mAP": mean(ap_coco[""]), "mAP75": mean(ap75),
              **{f"mAP{name}": mean(ap_coco[name]) for name in AREA_RANGES if name}, f"AR{max_dets}": mean(ar100),
              "AP50_per_class": ap50.tolist(), "AP_per_class": ap_coco[""].tolist()}
    if details:
        result["per_class"] = {"objects": objects.tolist(), "AP": ap_coco[""].tolist(), "AP50": ap50_coco.tolist(),
                               "AP75": ap75.tolist(), f"AR{max_dets}": ar100.tolist()}
        result["matches"] = matches
    return result


def match_voc(ious, gt_ignored, threshold):
    """The VOC devkit's rule: a detection takes the ground truth it overlaps most; above the
    threshold it is a true positive if that object is not yet taken, ignored if the object is
    (difficult or a crowd), and a false positive otherwise. ious (N, D, G), detections sorted by score."""
    N, D, G = ious.shape
    taken = torch.zeros(N, G, dtype=torch.bool)
    tp, ignored = torch.zeros(N, D, dtype=torch.bool), torch.zeros(N, D, dtype=torch.bool)
    for r in range(D):
        best, j = ious[:, r].max(-1)  # (N,)
        hit = best > threshold
        hard = gt_ignored.gather(1, j[:, None])[:, 0]
        tp[:, r] = hit & ~hard & ~taken.gather(1, j[:, None])[:, 0]
        ignored[:, r] = hit & hard
        taken.scatter_(1, j[:, None], (taken.gather(1, j[:, None])[:, 0] | tp[:, r])[:, None])
    return tp, ignored


def match_coco(ious, gt_ignored, gt_crowd, thresholds, counted):
    """COCOeval's rule, at every IoU threshold at once: a detection takes the object it overlaps
    most (IoU >= threshold, ties to the later object) among those not yet taken, preferring real
    objects to ignored ones (difficult, crowd or outside the area range); if it takes an ignored one
    it is ignored too. A crowd is never used up. counted (N, D): the detections that count (the top
    max_dets of their image and class); the others are ignored. Returns tp, ignored and the index of
    the object each detection took, -1 for none (T, N, D)."""
    N, D, G = ious.shape
    T = len(thresholds)
    taken = torch.zeros(T, N, G, dtype=torch.bool)
    tp, ignored = torch.zeros(T, N, D, dtype=torch.bool), (~counted)[None].repeat(T, 1, 1)
    matched = torch.full((T, N, D), -1, dtype=torch.int64)
    crowd = gt_crowd[None].expand(T, N, G)

    def last_argmax(x):  # COCOeval keeps the last of equal IoUs
        return G - 1 - x.flip(-1).argmax(-1)

    for r in range(D):
        iou = ious[None, :, r].expand(T, N, G)
        free = ~taken & (iou >= thresholds[:, None, None]) & counted[None, :, r, None]  # (T, N, G)
        real, hard = free & ~gt_ignored, free & gt_ignored
        j_real = last_argmax(torch.where(real, iou, -2.0))
        j_hard = last_argmax(torch.where(hard, iou, -2.0))
        has_real, has_hard = real.any(-1), hard.any(-1)  # (T, N)
        j = torch.where(has_real, j_real, j_hard)[..., None]
        tp[:, :, r] = has_real
        ignored[:, :, r] |= ~has_real & has_hard
        matched[:, :, r] = torch.where(has_real | has_hard, j[..., 0], -1)
        used_up = (has_real | has_hard)[..., None] & ~crowd.gather(2, j)
        taken.scatter_(2, j, taken.gather(2, j) | used_up)
    return tp, ignored, matched


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


def ground_truth(record):
    """A json record's objects as compute_map reads them: original pixels, difficult objects and
    crowds flagged, COCO areas where the json has them."""
    gt = {"boxes": torch.tensor(record["boxes"], dtype=torch.float64).reshape(-1, 4),
          "labels": torch.tensor(record["labels"], dtype=torch.int64)}
    for key in ("difficult", "iscrowd", "area"):
        if key in record:
            gt[key] = torch.tensor(record[key])
    return gt


def top_of_each_class(labels, max_dets):
    """(D,) True for the detections among the first max_dets of their class; labels (D,) surest first."""
    return (labels[:, None] == labels[None, :]).tril(-1).sum(1) < max_dets


def coco_results(detections, image_ids, category_ids=None):
    """Detections as COCO results records (what pycocotools' loadRes reads): one per detection, with
    the dataset's own category id where it has them (else the label) and bbox [x, y, w, h] in the
    original image's pixels."""
    records = []
    for det, image_id in zip(detections, image_ids):
        xywh = box_convert(det["boxes"].double(), "xyxy", "xywh")
        for box, score, label in zip(xywh.tolist(), det["scores"].tolist(), det["labels"].tolist()):
            # the score unrounded: rounded, near-certain scores tie, and AP counts the ties in another order
            records.append({"image_id": image_id, "category_id": category_ids[label] if category_ids else label,
                            "bbox": [round(v, 3) for v in box], "score": score})
    return records


# -----------------------------------------------------------------------------
# training diagnostics (lib.run.training_diagnostics logs them, tools/analyses.py --log draws them)


def paired_iou(a, b):
    """(M,) the IoU of each box of a (M, 4) with the same row of b, (x0, y0, x1, y1): M values, not box_iou's M x M."""
    inter = (torch.min(a[:, 2:], b[:, 2:]) - torch.max(a[:, :2], b[:, :2])).clamp(min=0).prod(1)
    return inter / (box_area(a) + box_area(b) - inter)


def query_diagnostics(outputs, targets, num_queries, matched, dn_pairs=None, sigmoid=False):
    """How alike a model's first num_queries queries are (one group, no denoising queries), and how
    close their boxes are to the objects at each decoder layer:
    - query_classes: how many distinct classes ("no object" included) the queries of an image
      predict, averaged over the batch: 1 while every query says the same thing;
    - query_box_spread: the standard deviation of the predicted box centres across the queries of
      an image (in image widths), averaged over the batch: near 0 while every query gives one box;
    - query_box_image_std: the standard deviation of each query's box centre across the images of the
      batch (in image widths), averaged over the queries: near 0 while the queries ignore the image,
      each giving its own box whatever the image shows (DETR's early plateau);
    - iou_start, iou_layer_0 ... iou_layer_{L-1}: the mean IoU with their matched objects (matched: per
      image the last layer's (query, target) pairs) of the boxes the queries start from (anchors or
      encoder proposals) and of each decoder layer's boxes: whether each layer improves on the one before;
    - iou_dn_start, iou_dn_layer_*: the same for the denoising queries and the objects they copy (dn_pairs)."""
    Q = num_queries
    logits = outputs["pred_logits"][:, :Q]
    classes = logits.argmax(-1)  # (B, Q)
    if sigmoid:  # sigmoid scores (the model's sigmoid_classes): "no object" where no class passes 0.5
        classes = classes.masked_fill(logits.max(-1).values < 0, logits.shape[-1])
    record = {"query_classes": float(np.mean([len(c.unique()) for c in classes]))}
    centres = outputs["pred_boxes"][:, :Q, :2].float()  # (B, Q, 2)
    record["query_box_spread"] = centres.var(1, unbiased=False).sum(-1).sqrt().mean().item()
    record["query_box_image_std"] = (centres.var(0, unbiased=False).sum(-1).sqrt().mean().item() if len(centres) > 1
                                     else math.nan)
    layers = [o["pred_boxes"][:, :Q] for o in outputs["aux_outputs"] + [outputs]]
    boxes = {"start": outputs.get("start_boxes"), **{f"layer_{l}": b for l, b in enumerate(layers)}}
    if "dn_outputs" in outputs:
        dn = outputs["dn_outputs"]
        boxes.update({"dn_start": dn["start_boxes"], **{f"dn_layer_{l}": b for l, b in enumerate(dn["pred_boxes"])}})
    for name, b in boxes.items():
        if b is not None:
            pairs = dn_pairs if name.startswith("dn") else matched
            pred = torch.cat([b[i, p.to(b.device)] for i, (p, _) in enumerate(pairs)]).float()
            truth = torch.cat([t["boxes"][j.to(t["boxes"].device)] for t, (_, j) in zip(targets, pairs)]).float()
            iou = paired_iou(box_convert(pred, "cxcywh", "xyxy"), box_convert(truth, "cxcywh", "xyxy"))
            record[f"iou_{name}"] = iou.mean().item() if len(iou) else math.nan
    return record


# DETR's early plateau, as the diagnostics show it (calibrated on two shapes runs, EXPERIMENTS.md: the
# README's run, which leaves the plateau by step 700, and vanilla DETR's, which stays on it)
PLATEAU_IMAGE_STD = 0.05  # each query's box moves less than this (image widths) from image to image ...
PLATEAU_CLASSES = 1.2  # ... or the queries of an image predict fewer distinct classes than this


def plateau_warning(record, warmup_iters):
    """One warning line when a training record (after the warm-up) shows the plateau, else None."""
    if record["iter"] <= warmup_iters or "query_box_image_std" not in record:
        return None
    moves, classes = record["query_box_image_std"], record["query_classes"]
    if not (moves < PLATEAU_IMAGE_STD or classes < PLATEAU_CLASSES):  # NaN (one image a batch) is no sign
        return None
    what = f"box whatever the image ({moves:.3f} image widths from image to image)" if moves < PLATEAU_IMAGE_STD \
        else f"class ({classes:.1f} classes an image)"
    return (f"warning: iteration {record['iter']}: DETR's early plateau: every query gives nearly the same {what}: the "
            f"model has not yet learnt where the objects are. It may leave it with more steps; faster with the "
            f"additions (config/shapes.py), a pretrained start (--init_from) or a lower learning_rate "
            f"(tools/analyses.py --log draws it)")
