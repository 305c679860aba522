"""
Evaluate a detector on a prepared split and write a report of how it does, class by class and image
by image: the tables, curves and pictures of a paper's results section.

    python eval.py --ckpt=out-shapes/best.pt                   # the checkpoint's own val split -> report/
    python eval.py --ckpt=out-voc/best.pt --split=test --threshold=0.3
    python eval.py --ckpt=detr-r50 --dataset=coco --split=val2017   # any model sample.py takes, on a prepared set

It writes to out_dir:
- per_class.csv and per_class.md (printed too): per class the objects COCO counts (no difficult ones,
  no crowds), COCO's AP (IoU 0.50:0.95), AP50, AP75 and AR100 (pycocotools' per-class figures; the
  markdown's last row holds their means, which are train.py's val_mAP, val_mAP75 and val_AR100), and
  the precision and recall of the detections scoring above --threshold, matched at IoU 0.5;
- summary.json: metrics.compute_map's output (VOC's mAP50 too), the settings and the image count;
- confusion_matrix.csv / .png: rows the true class, columns the predicted one, each plus
  "background", counting the detections above --threshold at IoU 0.5 (confusion_matrix below);
- pr_curves.png: precision against recall per class at IoU 0.5, the --threshold point marked;
- worst/: the --worst images with the most errors at --threshold (false positives plus missed
  objects), true positives, false positives and missed objects drawn in three colours.
The PNG figures need matplotlib (pip install matplotlib); without it they are one logged skip.

The model's classes are matched to the dataset's by name (case aside), so the official COCO model
can be scored on any set that names COCO classes; detections of other classes are left out.

A batch pads its images to the largest (and to a multiple of pad_to), and DETR's outputs change a
little with the padding: the attention masks it out, but the backbone's convolutions see its zeros
near the image's edge. So a model is evaluated as its run evaluated it (inference.predict, model.eval_config): a
minidetr checkpoint with its own batch_size and pad_to, the official and transformers models two
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
from torchvision.ops import box_iou

from configurator import configure, device_problem
from data.pipeline import DetectionDataset, dataset_dir, read_image, val_transform
from draw import draw_boxes, for_display, pyplot, save_figure, text_font
from inference import class_map, predict, run_dtype
from metrics import compute_map, ground_truth, precision_recall
from weights import LoadError, load_model

# defaults, each overridable as --key=value
ckpt = "out-shapes/best.pt"  # any model sample.py takes: a minidetr checkpoint, an official one, a transformers folder / hub id
dataset = ""  # a prepared dataset: a name under data/ or a folder; empty: the checkpoint's own
split = ""  # its split (<split>.json); empty: the checkpoint's val_split, else val
out_dir = "report"
threshold = 0.5  # a detection counts for precision, recall, the confusion matrix and worst/ when its score is above this
max_dets = 0  # detections per image and class that COCO's AP and AR count (train.py's key); 0: the checkpoint's own, else 100
worst = 8  # how many images worst/ draws
device = "cpu"
dtype = ""  # autocast dtype: float32 (none), bfloat16 or float16; empty: the checkpoint's own on a GPU, float32 on a CPU
batch_size = 0  # images per forward pass; 0: the checkpoint's own batch_size (the official models': 2), see above
num_workers = 2

IOU_THRESHOLD = 0.5  # the matching of the precision, recall, confusion matrix and worst/ (COCO's AP50, VOC's rule)
COLOURS = {"true positive": (0, 158, 115), "false positive": (213, 94, 0), "missed": (86, 180, 233)}  # Okabe-Ito: colour-blind safe


def image_errors(match, ignored, det, gt, threshold):
    """One image at the threshold: (true positives, false positives, missed objects) as index tensors into
    its detections, its detections and its objects. match / ignored: compute_map's matches (class-aware,
    COCO's rule at IoU 0.5); ignored detections (on a difficult object or a crowd) count as neither."""
    above = (det["scores"] > threshold) & ~ignored
    tp = torch.nonzero(above & (match >= 0)).flatten()
    fp = torch.nonzero(above & (match < 0)).flatten()
    found = torch.zeros(len(gt["labels"]), dtype=torch.bool)
    found[match[tp]] = True
    counted = ~found
    for key in ("difficult", "iscrowd"):
        if key in gt:
            counted &= ~gt[key].bool()
    return tp, fp, torch.nonzero(counted).flatten()


def confusion_matrix(detections, ground_truths, matches, errors, num_classes):
    """(C + 1, C + 1) counts: row the true class, column the predicted class, the last of each
    "background"; errors: image_errors of each image at the threshold. A detection that COCO's rule matched at IoU 0.5 (its own class)
    is on the diagonal; each of the others, in order of score, takes the free object of another class
    that it overlaps most at IoU >= 0.5 (a confusion), else it is a false positive (background row).
    The objects left over are missed (background column). So the diagonal is the true positives of
    precision and recall, a row sums to the class's objects, and a column to its detections."""
    matrix = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)
    background = num_classes
    for det, gt, (match, _), (tp, fp, missed) in zip(detections, ground_truths, matches, errors):
        for d in tp.tolist():
            matrix[gt["labels"][match[d]], det["labels"][d]] += 1
        free = torch.zeros(len(gt["labels"]), dtype=torch.bool)
        free[missed] = True
        fp = fp[det["scores"][fp].argsort(descending=True, stable=True)]
        ious = box_iou(det["boxes"][fp].double(), gt["boxes"].double().reshape(-1, 4)) if len(fp) else None
        for k, d in enumerate(fp.tolist()):
            candidates = free & (ious[k] >= IOU_THRESHOLD) & (gt["labels"] != det["labels"][d])
            if candidates.any():
                j = int(torch.where(candidates, ious[k], -1.0).argmax())
                free[j] = False
                matrix[gt["labels"][j], det["labels"][d]] += 1
            else:
                matrix[background, det["labels"][d]] += 1
        for j in torch.nonzero(free).flatten().tolist():
            matrix[gt["labels"][j], background] += 1
    return matrix


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
        rows.append([name, objects] + [per_class[k][c] for k in ("AP", "AP50", "AP75", f"AR{max_dets}")] + [precision, recall])
    return rows


def markdown_table(header, rows):
    """The per-class rows and, last, their means over the classes with objects (for AP, AP75 and AR
    those are compute_map's mAP, mAP75 and AR) as a markdown table, its columns aligned for a terminal."""
    def mean(values):
        values = [v for v in values if not math.isnan(v)]
        return sum(values) / len(values) if values else math.nan

    def cell(v):
        return ("-" if math.isnan(v) else f"{v:.3f}") if isinstance(v, float) else str(v)

    counted = [r for r in rows if r[1] > 0]
    means = ["mean", sum(r[1] for r in rows)] + [mean([r[k] for r in counted]) for k in range(2, len(header))]
    table = [header] + [[cell(v) for v in r] for r in rows + [means]]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ["| " + " | ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))) + " |" for r in table]
    lines.insert(1, "|" + "|".join("-" * (w + 1) + (":" if i else "-") for i, w in enumerate(widths)) + "|")  # numbers right-aligned
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
    names = list(classes) + ["background"]
    n = len(names)
    shares = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    side = max(6.0, 0.35 * n + 2)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the row")
    ax.set_xticks(range(n), names, rotation=90 if n > 6 else 0, fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"confusion matrix at IoU 0.5, score > {threshold:g}")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if shares[i, j] > 0.5 else "black")
    save_figure(fig, path, f"{n - 1} classes and background")


def draw_errors(path, det, gt, errors, classes, title):
    """One image, upscaled as sample.py draws (short side >= 512): true positives, false positives and
    missed objects in their COLOURS, under a title with the counts."""
    pixels = read_image(path)
    if pixels is None:
        return None
    picture, scale = for_display(pixels)
    tp, fp, missed = errors
    boxes = torch.cat([det["boxes"][tp], det["boxes"][fp], gt["boxes"][missed].float().reshape(-1, 4)]) * scale
    texts = ([f"{classes[l]} {s:.2f}" for l, s in zip(det["labels"][tp].tolist(), det["scores"][tp].tolist())]
             + [f"{classes[l]} {s:.2f}" for l, s in zip(det["labels"][fp].tolist(), det["scores"][fp].tolist())]
             + [f"missed {classes[l]}" for l in gt["labels"][missed].tolist()])
    colours = [COLOURS["true positive"]] * len(tp) + [COLOURS["false positive"]] * len(fp) + [COLOURS["missed"]] * len(missed)
    draw_boxes(picture, boxes, texts, colours)
    # the title: the file, then each kind with its count on its own colour, on as many lines as it takes
    font = text_font(picture)
    line = font.size + 12
    items = [(title, None)] + [(f"{n} {kind}{'s' if n != 1 and kind != 'missed' else ''}", COLOURS[kind])
                               for n, kind in zip(map(len, errors), COLOURS)]
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
    detections = []
    for i in indices:
        det = predictions[i]
        labels = mapping[det["labels"]]
        keep = labels >= 0
        detections.append({"boxes": det["boxes"][keep], "scores": det["scores"][keep], "labels": labels[keep]})
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
    print(f"mAP {result['mAP']:.4f}, mAP75 {result['mAP75']:.4f}, AR{max_dets} {result[f'AR{max_dets}']:.4f} (max_dets={max_dets}); "
          f"VOC's mAP50 {result['mAP50']:.4f} (train.py's val_mAP50; the table's AP50 is COCO's); "
          f"precision and recall at score > {threshold:g}, IoU 0.5")

    errors = [image_errors(m, ig, d, g, threshold) for (m, ig), d, g in zip(matches, detections, ground_truths)]
    matrix = confusion_matrix(detections, ground_truths, matches, errors, len(data.classes))
    names = list(data.classes) + ["background"]
    with open(os.path.join(out_dir, "confusion_matrix.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["true \\ predicted"] + names)
        writer.writerows([[name] + row.tolist() for name, row in zip(names, matrix)])

    summary = {"checkpoint": source, "json": data.json_path, "images": len(indices), "images_unreadable": len(data) - len(indices),
               "threshold": threshold, "max_dets": max_dets, "iou_threshold": IOU_THRESHOLD, "classes": data.classes, **result}
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(no_nan(summary), f, indent=1, allow_nan=False)
    try:
        plt = pyplot()
    except SystemExit:  # matplotlib is optional here: the tables and worst/ need none
        plt = None
        print("skip: pr_curves.png and confusion_matrix.png need matplotlib (pip install matplotlib)")
    if plt is not None:
        plot_pr_curves(plt, data.classes, curves, rows, threshold, os.path.join(out_dir, "pr_curves.png"))
        plot_confusion_matrix(plt, data.classes, matrix, threshold, os.path.join(out_dir, "confusion_matrix.png"))

    # worst/: the images with the most false positives plus missed objects
    counts = [len(fp) + len(missed) for _, fp, missed in errors]
    ranked = [k for k in sorted(range(len(indices)), key=lambda k: -counts[k]) if counts[k] > 0][:worst]
    worst_dir = os.path.join(out_dir, "worst")
    os.makedirs(worst_dir, exist_ok=True)
    for stale in os.listdir(worst_dir):  # an earlier report's pictures (NN_name.png): they would read as this one's
        if re.fullmatch(r"\d{2}_.+\.png", stale):
            os.remove(os.path.join(worst_dir, stale))
    for rank, k in enumerate(ranked):
        i = indices[k]
        record = data.records[i]
        picture = draw_errors(data.paths[i], detections[k], ground_truths[k], errors[k], data.classes, os.path.basename(record["file"]))
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
    model.to(device)
    try:
        predictions = predict(model, data, device, batch_size or None, None, dtype or run_dtype(model, device), num_workers)
    except RuntimeError as e:  # DetectionDataset's: every image of the split is unreadable
        if "could be decoded" not in str(e):
            raise
        raise SystemExit(f"error: no image of {path} could be decoded")
    report(model, data, predictions, out_dir, threshold, dets, worst, ckpt)


if __name__ == "__main__":
    flags = ("ckpt", "dataset", "split", "out_dir", "threshold", "max_dets", "worst", "device", "dtype", "batch_size",
             "num_workers")
    globals().update(configure({k: globals()[k] for k in flags}, sys.argv[1:]))
    if not 0 <= threshold < 1 or min(max_dets, worst, batch_size, num_workers) < 0:
        sys.exit("error: --threshold must be in [0, 1), --max_dets, --worst, --batch_size and --num_workers >= 0")
    if dtype not in ("", "float32", "bfloat16", "float16"):
        sys.exit(f"error: --dtype={dtype} should be float32, bfloat16 or float16")
    if device_problem(device):
        sys.exit(f"error: {device_problem(device)}")
    try:  # before the model runs over the split, not after
        os.makedirs(os.path.join(out_dir, "worst"), exist_ok=True)
    except OSError as e:
        sys.exit(f"error: cannot write the report to --out_dir={out_dir} ({e.strerror})")
    main()
