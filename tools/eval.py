"""
Evaluate a detector on a prepared split and write a report of how it does, class by class and image
by image: the tables, curves and pictures of a paper's results section.

    python tools/eval.py --ckpt=out-shapes/best.pt                   # the checkpoint's own val split -> report/
    python tools/eval.py --ckpt=out-voc/best.pt --split=test --threshold=0.3
    python tools/eval.py --ckpt=detr-r50 --dataset=coco --split=val2017   # any model sample.py takes, on a prepared set
    python tools/eval.py --ckpt=out-shapes/best.pt --layers          # also AP after each decoder layer (paper Fig. 4)

It writes to out_dir:
- per_class.csv and per_class.md (printed too): per class the objects COCO counts (no difficult ones,
  no crowds), COCO's AP (IoU 0.50:0.95), AP50, AP75 and AR100 (pycocotools' per-class figures; the
  markdown's last row holds their means, which are train.py's val_mAP, val_mAP75 and val_AR100), and
  the precision and recall of the detections scoring above --threshold, matched at IoU 0.5;
- summary.json: metrics.compute_map's output (VOC's mAP50 too), the settings and the image count;
- errors.csv (printed too): per class its objects, true positives, false positives by kind (TIDE's:
  duplicate, wrong class, poor localisation, background; image_errors below) and missed objects, at
  --threshold and IoU 0.5;
- confusion_matrix.csv / .png: rows the true class, then the false positives on no object of another
  class by kind (duplicate, poor localisation, background); columns the predicted class, then
  "missed" (confusion_matrix below);
- pr_curves.png: precision against recall per class at IoU 0.5, the --threshold point marked;
- by_object_count.csv / .png: recall and COCO's AP by the objects an image holds (the paper's §4.2);
- with --layers, layers.csv / .png: COCO's AP and AP50 after each decoder layer, without and with
  class-wise NMS at --nms_iou (the paper's Fig. 4);
- worst/: the --worst images with the most errors at --threshold (false positives plus missed
  objects), true positives, false positives and missed objects drawn in three colours.
The PNG figures need matplotlib (pip install matplotlib); without it they are one logged skip.

The model's classes are matched to the dataset's by name (case aside, VOC's names as COCO's), so the
official COCO model can be scored on any set that names COCO classes; detections of other classes are
left out.

A batch pads its images to the largest (and to a multiple of pad_to), and DETR's outputs change a
little with the padding: the attention masks it out, but the backbone's convolutions see its zeros
near the image's edge. So a model is evaluated as its run evaluated it (inference.predict, its
model.eval_config): a minidetr checkpoint with its own batch_size and pad_to, the official and transformers models two
images a batch (DC5: one), as they were trained; it then gives exactly the val numbers that its run
logged (under torchrun too: each process evaluated whole batches of the same images).
"""

import csv
import json
import math
import os
import re
import sys

import numpy as np
import torch
from PIL import Image, ImageDraw
from torchvision.ops import batched_nms, box_iou

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from configurator import configure, device_problem
from data.pipeline import DetectionDataset, dataset_dir, read_image, val_transform
from lib.draw import draw_boxes, for_display, pyplot, save_figure, text_font
from lib.inference import class_map, predict, run_dtype
from lib.metrics import compute_map, ground_truth, precision_recall
from lib.weights import LoadError, load_model

# defaults, each overridable as --key=value
ckpt = "out-shapes/best.pt"  # what sample.py takes: a minidetr or official checkpoint, a transformers folder / hub id
dataset = ""  # a prepared dataset: a name under data/ or a folder; empty: the checkpoint's own
split = ""  # its split (<split>.json); empty: the checkpoint's val_split, else val
out_dir = "report"  # where the tables and pictures go
threshold = 0.5  # a detection counts for precision, recall, the confusion matrix and worst/ when its score is above it
max_dets = 0  # detections per image and class COCO's AP and AR count (train.py's key); 0: the checkpoint's, else 100
worst = 8  # how many images worst/ draws
device = "cpu"  # cpu, or cuda
dtype = ""  # autocast dtype: float32 (none), bfloat16 or float16; empty: the checkpoint's on a GPU, float32 on a CPU
batch_size = 0  # images per forward pass; 0: the checkpoint's own batch_size (the official models': 2), see above
num_workers = 2  # data-loading processes
layers = False  # also AP after every decoder layer, with and without NMS (the paper's Fig. 4): layers.csv and .png
nms_iou = 0.7  # --layers: the IoU above which class-wise NMS (torchvision's batched_nms) drops the less sure box

IOU_THRESHOLD = 0.5  # the matching of the precision, recall, confusion matrix and worst/ (COCO's AP50, VOC's rule)
# Okabe-Ito: colour-blind safe
COLOURS = {"true positive": (0, 158, 115), "false positive": (213, 94, 0), "missed": (86, 180, 233)}


FALSE_POSITIVE_KINDS = ("duplicate", "wrong class", "poor localisation", "background")  # TIDE's (Bolya et al. 2020)
CONFUSION_ROWS = ("duplicate", "poor localisation", "background")  # the confusion matrix's rows after the classes
BACKGROUND_IOU = 0.1  # below this IoU with every object a false positive is on the background (TIDE's t_b)


def image_errors(match, ignored, det, gt, threshold):
    """One image at the threshold: (true positives, false positives, missed objects) as index tensors into
    its detections, its detections and its objects, and each false positive's kind and object (-1 for
    none). match / ignored: compute_map's matches (class-aware, COCO's rule at IoU 0.5); ignored detections
    (on a difficult object or a crowd) count as neither. The false positives, surest first, are (TIDE's
    error types, at IoU 0.5 and BACKGROUND_IOU):
    - wrong class: on an object of another class that nothing has found yet (it takes it);
    - duplicate: on an object already found (by a true positive or a surer wrong class), DETR's lesson:
      the set loss is there to remove them;
    - poor localisation: overlapping an object at IoU 0.1 to 0.5 (TIDE's "both" too, of another class);
    - background: on nothing.
    The missed objects are those nothing found (difficult ones and crowds aside)."""
    above = (det["scores"] > threshold) & ~ignored
    tp = torch.nonzero(above & (match >= 0)).flatten()
    fp = torch.nonzero(above & (match < 0)).flatten()
    fp = fp[det["scores"][fp].argsort(descending=True, stable=True)]
    found = torch.zeros(len(gt["labels"]), dtype=torch.bool)
    found[match[tp]] = True
    ious = box_iou(det["boxes"][fp].double(), gt["boxes"].double().reshape(-1, 4))  # (FP, objects)
    counted, kinds, objects = counted_objects(gt), [], []
    for k, d in enumerate(fp.tolist()):
        other = ~found & counted & (ious[k] >= IOU_THRESHOLD) & (gt["labels"] != det["labels"][d])
        if other.any():
            j = int(torch.where(other, ious[k], -1.0).argmax())
            found[j] = True
            kinds.append("wrong class")
        else:
            j = int(ious[k].argmax()) if len(gt["labels"]) else -1
            best = float(ious[k, j]) if j >= 0 else 0.0
            kinds.append("duplicate" if best >= IOU_THRESHOLD
                         else "poor localisation" if best >= BACKGROUND_IOU else "background")
            j = -1
        objects.append(j)
    return tp, fp, torch.nonzero(~found & counted).flatten(), kinds, objects


def counted_objects(gt):
    """(objects,) True for the objects that COCO's metrics count: not VOC's difficult ones, not crowds."""
    counted = torch.ones(len(gt["labels"]), dtype=torch.bool)
    for key in ("difficult", "iscrowd"):
        if key in gt:
            counted &= ~gt[key].bool()
    return counted


def confusion_matrix(detections, ground_truths, matches, errors, num_classes):
    """(C + 3, C + 1) counts at the threshold (image_errors of each image): the rows the true classes, then
    the false positives on no object of another class by kind (duplicate, poor localisation, background);
    the columns the predicted classes, then "missed". A true positive is on the diagonal, a wrong class
    in its object's row; each missed object is in the last column. So a class's row sums to its objects
    (difficult ones and crowds aside), a class's column to its detections."""
    rows = {kind: num_classes + i for i, kind in enumerate(CONFUSION_ROWS)}
    matrix = np.zeros((num_classes + 3, num_classes + 1), dtype=np.int64)
    for det, gt, (match, _), (tp, fp, missed, kinds, objects) in zip(detections, ground_truths, matches, errors):
        for d in tp.tolist():
            matrix[gt["labels"][match[d]], det["labels"][d]] += 1
        for d, kind, j in zip(fp.tolist(), kinds, objects):
            matrix[gt["labels"][j] if kind == "wrong class" else rows[kind], det["labels"][d]] += 1
        for j in missed.tolist():
            matrix[gt["labels"][j], num_classes] += 1
    return matrix


def error_table(detections, ground_truths, errors, classes):
    """Per class, then in all: its objects, true positives, false positives by kind (by the predicted
    class) and missed objects (by the object's class), at the threshold."""
    columns = ["objects", "true positives", *FALSE_POSITIVE_KINDS, "missed"]
    counts = np.zeros((len(classes), len(columns)), dtype=np.int64)
    for det, gt, (tp, fp, missed, kinds, _) in zip(detections, ground_truths, errors):
        np.add.at(counts[:, 0], gt["labels"][counted_objects(gt)].numpy(), 1)
        np.add.at(counts[:, 1], det["labels"][tp].numpy(), 1)
        for d, kind in zip(fp.tolist(), kinds):
            counts[det["labels"][d], 2 + FALSE_POSITIVE_KINDS.index(kind)] += 1
        np.add.at(counts[:, -1], gt["labels"][missed].numpy(), 1)
    return (["class", *columns],
            [[c, *row.tolist()] for c, row in zip(classes, counts)] + [["all", *counts.sum(0).tolist()]])


def class_curves(detections, matches, num_classes):
    """Per class (scores, true-positive flags) of its counted detections in order of score, as
    compute_map ranks them at IoU 0.5: the points of its precision-recall curve."""
    scores, tps, labels = [], [], []
    for det, (match, ignored) in zip(detections, matches):
        keep = ~ignored
        scores.append(det["scores"][keep])
        tps.append(match[keep] >= 0)
        labels.append(det["labels"][keep])
    scores, tps, labels = torch.cat(scores), torch.cat(tps), torch.cat(labels)
    curves = []
    for c in range(num_classes):
        mine = labels == c
        order = scores[mine].argsort(descending=True, stable=True)
        curves.append((scores[mine][order].numpy(), tps[mine][order].numpy()))
    return curves


def per_class_table(classes, result, curves, threshold, max_dets):
    """One row per class: class, objects, AP, AP50, AP75, AR<max_dets>, precision, recall (see the docstring)."""
    per_class = result["per_class"]
    rows = []
    for c, name in enumerate(classes):
        objects = per_class["objects"][c]
        scores, tp = curves[c]
        above = int((scores > threshold).sum())
        true = int(tp[:above].sum())
        precision = true / above if above else math.nan
        recall = true / objects if objects else math.nan
        rows.append([name, objects] + [per_class[k][c] for k in ("AP", "AP50", "AP75", f"AR{max_dets}")]
                    + [precision, recall])
    return rows


def markdown_table(header, rows, total="mean"):
    """Rows as a markdown table, its columns aligned for a terminal, then total: a last row, or "mean" for
    the means over the classes with objects (for AP, AP75 and AR those are compute_map's mAP, mAP75 and
    AR), or None for none."""
    def mean(values):
        values = [v for v in values if not math.isnan(v)]
        return sum(values) / len(values) if values else math.nan

    def cell(v):
        return ("-" if math.isnan(v) else f"{v:.3f}") if isinstance(v, float) else str(v)

    counted = [r for r in rows if r[1] > 0]
    if total == "mean":
        total = ["mean", sum(r[1] for r in rows)] + [mean([r[k] for r in counted]) for k in range(2, len(header))]
    table = [header] + [[cell(v) for v in r] for r in rows + ([total] if total else [])]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ["| " + " | ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))) + " |"
             for r in table]
    # numbers right-aligned
    lines.insert(1, "|" + "|".join("-" * (w + 1) + (":" if i else "-") for i, w in enumerate(widths)) + "|")
    return "\n".join(lines) + "\n"


def plot_pr_curves(plt, classes, curves, rows, threshold, path):
    """One panel per class: precision against recall at IoU 0.5 (COCO's enveloped curve dashed), the
    point at the threshold marked."""
    columns = min(len(classes), 5)
    grid_rows = math.ceil(len(classes) / columns)
    fig, axes = plt.subplots(grid_rows, columns, figsize=(3.2 * columns, 3.0 * grid_rows + 0.6), squeeze=False)
    for ax, name, (scores, tp), row in zip(axes.flat, classes, curves, rows):
        objects = row[1]
        ax.set_title(f"{name} ({objects} objects): AP50 {row[3]:.3f}" if objects else f"{name}: no objects", fontsize=9)
        if objects and len(tp):
            precision, recall = precision_recall(tp, objects)
            ax.step(np.concatenate([[0], recall]), np.concatenate([[precision[0]], precision]), where="pre", color="C0")
            ax.plot(recall, np.maximum.accumulate(precision[::-1])[::-1], color="C0", linestyle="--", linewidth=0.8)
            above = int((scores > threshold).sum())
            if above:
                ax.plot(recall[above - 1], precision[above - 1], "o", color="C3", label=f"score > {threshold:g}")
                ax.legend(fontsize=7, loc="lower left")
        ax.set_xlim(0, 1.02)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("recall", fontsize=8)
        ax.set_ylabel("precision", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(classes):]:
        ax.axis("off")
    fig.suptitle("precision-recall at IoU 0.5")
    save_figure(fig, path, f"{len(classes)} classes' curves")


def plot_confusion_matrix(plt, classes, matrix, threshold, path):
    """The matrix as a heat map, each row scaled by its total (what share of a class's objects went
    where), with the counts written in when there are few enough classes to read them."""
    rows, columns = list(classes) + list(CONFUSION_ROWS), list(classes) + ["missed"]
    shares = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    side = max(6.0, 0.35 * len(rows) + 2)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the row")
    ax.set_xticks(range(len(columns)), columns, rotation=90 if len(columns) > 6 else 0, fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.axhline(len(classes) - 0.5, color="black", linewidth=1)  # below: the false positives on no object, by kind
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class, then the false positives' kind")
    ax.set_title(f"confusion matrix at IoU 0.5, score > {threshold:g}")
    if len(rows) <= 33:
        for i in range(len(rows)):
            for j in range(len(columns)):
                if matrix[i, j]:
                    ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if shares[i, j] > 0.5 else "black")
    save_figure(fig, path, f"{len(classes)} classes, the errors by kind")


def error_counts(errors):
    """The title's counts, [(text, colour)], each as the boxes are labelled: the true positives, each kind of
    false positive that the image has (so an object taken for another class is counted as that), the missed."""
    tp, fp, missed, kinds, _ = errors
    wrong = [(f"{kind}: {kinds.count(kind)}", COLOURS["false positive"])
             for kind in FALSE_POSITIVE_KINDS if kind in kinds]
    return [(f"true positives: {len(tp)}", COLOURS["true positive"]), *wrong,
            (f"missed: {len(missed)}", COLOURS["missed"])]


def draw_errors(path, det, gt, errors, classes, title):
    """One image, upscaled as sample.py draws (short side >= 512): true positives, false positives and
    missed objects in their COLOURS, under a title with the counts."""
    pixels = read_image(path)
    if pixels is None:
        return None
    picture, scale = for_display(pixels)
    tp, fp, missed, kinds, _ = errors
    boxes = torch.cat([det["boxes"][tp], det["boxes"][fp], gt["boxes"][missed].float().reshape(-1, 4)]) * scale
    texts = ([f"{classes[l]} {s:.2f}" for l, s in zip(det["labels"][tp].tolist(), det["scores"][tp].tolist())]
             + [f"{classes[l]} {s:.2f} {k}"
                for l, s, k in zip(det["labels"][fp].tolist(), det["scores"][fp].tolist(), kinds)]
             + [f"missed {classes[l]}" for l in gt["labels"][missed].tolist()])
    colours = ([COLOURS["true positive"]] * len(tp) + [COLOURS["false positive"]] * len(fp)
               + [COLOURS["missed"]] * len(missed))
    draw_boxes(picture, boxes, texts, colours)
    # the title: the file, then each kind with its count on its own colour, on as many lines as it takes
    font = text_font(picture)
    line = font.size + 12
    items = [(title, None)] + error_counts(errors)
    measure = ImageDraw.Draw(picture)
    places, x, y = [], 4, 0
    for text, colour in items:
        left, top, right, bottom = measure.textbbox((0, 0), text, font=font)
        if x > 4 and x + right - left + 6 > picture.width:  # no room left on this line
            x, y = 4, y + line
        places.append((x, y, text, colour, left, top, right))
        x += right - left + 14
    sheet = Image.new("RGB", (picture.width, picture.height + y + line), "white")
    sheet.paste(picture, (0, y + line))
    draw = ImageDraw.Draw(sheet)
    for x, y, text, colour, left, top, right in places:
        if colour:
            draw.rectangle((x, y + 4, x + right - left + 6, y + line - 4), fill=colour)
        draw.text((x + 3 - left, y + 6 - top), text, fill="black", font=font)
    return sheet


def in_dataset_classes(det, mapping):
    """One image's detections with the model's labels as the dataset's classes (class_map), those of
    classes the dataset lacks left out."""
    labels = mapping[det["labels"]]
    keep = labels >= 0
    return {"boxes": det["boxes"][keep], "scores": det["scores"][keep], "labels": labels[keep]}


def coco_ap50(result):
    """COCO's AP50 (101-point, IoU 0.5): the mean over the classes with objects of compute_map's per_class
    AP50, as per_class.md's mean row counts it."""
    values = [ap for ap, n in zip(result["per_class"]["AP50"], result["per_class"]["objects"]) if n > 0 and ap == ap]
    return sum(values) / len(values) if values else math.nan


def layer_table(predictions, data, mapping, max_dets, iou):
    """The paper's Fig. 4 as rows (layer, nms, AP, AP50): COCO's AP and AP50 of the detections after each
    decoder layer (1 to L), as they are and after class-wise NMS at IoU iou. The last layer's first row is
    the report's own mAP and AP50."""
    indices = sorted(predictions)
    ground_truths = [ground_truth(data.records[i]) for i in indices]
    rows = []
    for layer in range(len(predictions[indices[0]]["layers"])):
        detections = [in_dataset_classes(predictions[i]["layers"][layer], mapping) for i in indices]
        kept = [{k: v[batched_nms(d["boxes"], d["scores"], d["labels"], iou)] for k, v in d.items()}
                for d in detections]
        for nms, dets in ((False, detections), (True, kept)):
            result = compute_map(dets, ground_truths, len(data.classes), max_dets, details=True)
            rows.append([layer + 1, nms, result["mAP"], coco_ap50(result)])
    return ["layer", "nms", "AP", "AP50"], rows


def plot_layers(plt, rows, iou, path):
    """The paper's Fig. 4: AP and AP50 after each decoder layer, with NMS (dashed) and without."""
    fig, ax = plt.subplots(figsize=(8, 6))
    for column, colour in ((2, "tab:blue"), (3, "tab:orange")):
        for nms in (False, True):
            points = [(r[0], r[column]) for r in rows if r[1] == nms]
            ax.plot(*zip(*points), color=colour, marker="o", linestyle="--" if nms else "-",
                    label=f"{['AP', 'AP50'][column - 2]}{f' with NMS (IoU {iou:g})' if nms else ''}")
    ax.set_xticks(sorted({r[0] for r in rows}))
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("COCO's AP")
    ax.set_title("AP after each decoder layer (paper Fig. 4):\n"
                 "where NMS stops helping, the set loss has removed the duplicates")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path, f"{len(rows) // 2} decoder layers")


def by_object_count(detections, ground_truths, errors, num_classes, max_dets, result):
    """Rows (objects an image holds, images, objects, recall, AP, AP50), then all images: how the model does
    on crowded images (the paper's §4.2, "generalization to unseen numbers of instances"). Recall: the
    share of the objects found at the threshold; AP and AP50: COCO's, over those images alone (for all
    of them, result: the report's own compute_map of the split)."""
    counts = [int(counted_objects(gt).sum()) for gt in ground_truths]

    def row(n, picked, scored):
        objects = sum(counts[k] for k in picked)
        found = sum(len(errors[k][0]) for k in picked)
        return [n, len(picked), objects, found / objects if objects else math.nan, scored["mAP"], coco_ap50(scored)]

    rows = []
    for n in sorted(set(counts)):
        picked = [k for k, c in enumerate(counts) if c == n]
        scored = compute_map([detections[k] for k in picked], [ground_truths[k] for k in picked], num_classes, max_dets,
                             details=True)
        rows.append(row(n, picked, scored))
    return (["objects an image holds", "images", "objects", "recall", "AP", "AP50"],
            rows + [row("all", range(len(counts)), result)])


def plot_by_object_count(plt, rows, threshold, path):
    """Recall and AP by the objects an image holds, with each count's image number."""
    fig, ax = plt.subplots(figsize=(8, 6))
    counts = [r[0] for r in rows]
    ax.plot(counts, [r[3] for r in rows], marker="o", label=f"recall (score > {threshold:g}, IoU 0.5)")
    ax.plot(counts, [r[4] for r in rows], marker="o", label="COCO's AP")
    for r in rows:
        ax.annotate(f"{r[1]} images", (r[0], r[3]), textcoords="offset points", xytext=(0, 8), ha="center", fontsize=9)
    ax.set_xticks(counts)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("objects an image holds")
    ax.set_title("found objects by how many an image holds (paper §4.2)")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path, f"{len(rows)} object counts")


def no_nan(value):
    """value with every NaN (a class or area range without objects) as None: null in json, which every reader takes."""
    if isinstance(value, list):
        return [no_nan(v) for v in value]
    if isinstance(value, dict):
        return {k: no_nan(v) for k, v in value.items()}
    return None if isinstance(value, float) and math.isnan(value) else value


def report(model, data, predictions, out_dir, threshold, max_dets=100, worst=8, source=""):
    """Score the predictions (compute_map) and write every file of the report (worst/: the worst images;
    source: the model's file, for summary.json); returns compute_map's output."""
    mapping = class_map(model, data.classes)
    indices = sorted(predictions)
    detections = [in_dataset_classes(predictions[i], mapping) for i in indices]
    ground_truths = [ground_truth(data.records[i]) for i in indices]
    result = compute_map(detections, ground_truths, len(data.classes), max_dets, details=True)
    matches = result.pop("matches")
    os.makedirs(out_dir, exist_ok=True)

    curves = class_curves(detections, matches, len(data.classes))
    rows = per_class_table(data.classes, result, curves, threshold, max_dets)
    header = ["class", "objects", "AP", "AP50", "AP75", f"AR{max_dets}", "precision", "recall"]
    with open(os.path.join(out_dir, "per_class.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows([r[:2] + [f"{v:.6f}" for v in r[2:]] for r in rows])
    table = markdown_table(header, rows)
    with open(os.path.join(out_dir, "per_class.md"), "w") as f:
        f.write(table)
    print(table, end="")
    limit = f" (at most {max_dets} detections an image and class)" if model.num_queries > max_dets else ""
    print(f"COCO's mAP {result['mAP']:.4f} (IoU 0.50:0.95), mAP75 {result['mAP75']:.4f}, AR{max_dets} "
          f"{result[f'AR{max_dets}']:.4f}{limit}; VOC's mAP50 {result['mAP50']:.4f} (train.py's val_mAP50: the VOC "
          f"devkit's all-point interpolation; the table's AP50 is COCO's 101-point one, so the two differ a little); "
          f"precision and recall at score > {threshold:g}, IoU 0.5")

    errors = [image_errors(m, ig, d, g, threshold) for (m, ig), d, g in zip(matches, detections, ground_truths)]
    header, error_rows = error_table(detections, ground_truths, errors, data.classes)
    with open(os.path.join(out_dir, "errors.csv"), "w", newline="") as f:
        csv.writer(f).writerows([header, *error_rows])
    print(f"the errors at score > {threshold:g}, IoU 0.5 (TIDE's kinds; false positives by their predicted class):")
    print(markdown_table(header, error_rows[:-1], total=error_rows[-1]), end="")
    matrix = confusion_matrix(detections, ground_truths, matches, errors, len(data.classes))
    with open(os.path.join(out_dir, "confusion_matrix.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["true \\ predicted"] + list(data.classes) + ["missed"])
        writer.writerows([[name] + row.tolist()
                          for name, row in zip(list(data.classes) + list(CONFUSION_ROWS), matrix)])

    summary = {"checkpoint": source, "json": data.json_path, "images": len(indices),
               "images_unreadable": len(data) - len(indices), "threshold": threshold, "max_dets": max_dets,
               "iou_threshold": IOU_THRESHOLD, "classes": data.classes, **result}
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(no_nan(summary), f, indent=1, allow_nan=False)
    try:
        plt = pyplot()
    except SystemExit:  # matplotlib is optional here: the tables and worst/ need none
        plt = None
        print("skip: pr_curves.png, confusion_matrix.png and by_object_count.png need matplotlib "
              "(pip install matplotlib)")
    if plt is not None:
        plot_pr_curves(plt, data.classes, curves, rows, threshold, os.path.join(out_dir, "pr_curves.png"))
        plot_confusion_matrix(plt, data.classes, matrix, threshold, os.path.join(out_dir, "confusion_matrix.png"))

    header, rows = by_object_count(detections, ground_truths, errors, len(data.classes), max_dets, result)
    with open(os.path.join(out_dir, "by_object_count.csv"), "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    print(f"by the objects an image holds (recall at score > {threshold:g}, IoU 0.5; COCO's AP and AP50):")
    print(markdown_table(header, rows[:-1], total=rows[-1]), end="")
    if plt is not None:
        plot_by_object_count(plt, rows[:-1], threshold, os.path.join(out_dir, "by_object_count.png"))

    # worst/: the images with the most false positives plus missed objects
    counts = [len(fp) + len(missed) for _, fp, missed, _, _ in errors]
    ranked = [k for k in sorted(range(len(indices)), key=lambda k: -counts[k]) if counts[k] > 0][:worst]
    worst_dir = os.path.join(out_dir, "worst")
    os.makedirs(worst_dir, exist_ok=True)
    for stale in os.listdir(worst_dir):  # an earlier report's pictures (NN_name.png): they would read as this one's
        if re.fullmatch(r"\d{2}_.+\.png", stale):
            os.remove(os.path.join(worst_dir, stale))
    for rank, k in enumerate(ranked):
        i = indices[k]
        record = data.records[i]
        picture = draw_errors(data.paths[i], detections[k], ground_truths[k], errors[k], data.classes,
                              os.path.basename(record["file"]))
        if picture is not None:
            name = os.path.splitext(os.path.basename(record["file"]))[0]
            picture.save(os.path.join(worst_dir, f"{rank:02d}_{name}.png"))
    print(f"{len(ranked)} images with the most errors -> {worst_dir}/ ({sum(counts)} errors in {len(indices)} images)")
    return result


def main():
    try:
        model, config = load_model(ckpt)
    except LoadError as e:
        raise SystemExit(f"error: {e}")
    dets = max_dets or config.get("max_dets", 100)
    name = dataset or config.get("dataset")
    if not name:
        raise SystemExit(f"error: {ckpt} names no dataset: give --dataset=NAME_OR_PATH (and --split)")
    path = os.path.join(dataset_dir(name), f"{split or config.get('val_split', 'val')}.json")
    if not os.path.isfile(path):
        raise SystemExit(f"error: no {path} (a prepared split: see data/format.py)")
    data = DetectionDataset(path, val_transform(config["val_scale"], config["max_size"]))
    if not len(data):
        raise SystemExit(f"error: {path} has no images")
    if layers and model.config["num_decoder_layers"] < 2:
        raise SystemExit(f"error: --layers compares the decoder's layers, and {ckpt} has one")
    model.to(device)
    try:
        predictions = predict(model, data, device, batch_size or None, None, dtype or run_dtype(model, device),
                              num_workers, layers=layers)
    except RuntimeError as e:  # DetectionDataset's: every image of the split is unreadable
        if "could be decoded" not in str(e):
            raise
        raise SystemExit(f"error: no image of {path} could be decoded")
    report(model, data, predictions, out_dir, threshold, dets, worst, ckpt)
    if layers:
        header, rows = layer_table(predictions, data, class_map(model, data.classes), dets, nms_iou)
        with open(os.path.join(out_dir, "layers.csv"), "w", newline="") as f:
            csv.writer(f).writerows([header, *rows])
        print(markdown_table(header, rows, total=None), end="")
        try:
            plot_layers(pyplot(), rows, nms_iou, os.path.join(out_dir, "layers.png"))
        except SystemExit:  # matplotlib is optional: layers.csv needs none
            print("skip: layers.png needs matplotlib (pip install matplotlib)")


if __name__ == "__main__":
    flags = ("ckpt", "dataset", "split", "out_dir", "threshold", "max_dets", "worst", "device", "dtype", "batch_size",
             "num_workers", "layers", "nms_iou")
    globals().update(configure({k: globals()[k] for k in flags}, sys.argv[1:]))
    if not 0 <= threshold < 1 or not 0 < nms_iou <= 1 or min(max_dets, worst, batch_size, num_workers) < 0:
        sys.exit("error: --threshold must be in [0, 1), --nms_iou in (0, 1], --max_dets, --worst, --batch_size and "
                 "--num_workers >= 0")
    if dtype not in ("", "float32", "bfloat16", "float16"):
        sys.exit(f"error: --dtype={dtype} should be float32, bfloat16 or float16")
    if device_problem(device):
        sys.exit(f"error: {device_problem(device)}")
    try:  # before the model runs over the split, not after
        os.makedirs(os.path.join(out_dir, "worst"), exist_ok=True)
    except OSError as e:
        sys.exit(f"error: cannot write the report to --out_dir={out_dir} ({e.strerror})")
    main()
