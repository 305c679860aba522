"""
Draw the paper's analyses of a trained model and its run: the training curves of its log, its weights
per part, the bipartite matching of its queries to objects (§3.1) and what each query slot predicts
(Fig. 7). Each figure needs matplotlib (pip install matplotlib).

    python tools/analyses.py --log=out-shapes/log.jsonl                # training curves -> samples/curves.png
    python tools/analyses.py --ckpt=out-shapes/ckpt.pt --weights       # weight histograms -> samples/weights.png
    python tools/analyses.py --ckpt=out-shapes/best.pt --matching      # which query took which object, at what cost
    python tools/analyses.py --ckpt=out-shapes/best.pt --slots         # every box of each query slot over val (Fig. 7)
    python tools/analyses.py --ckpt=out-voc-mini/best.pt --slots --split=train --num_slots=10

--matching writes <name>_matching.png for each of the first max_images images of a prepared split
(--split, else the checkpoint's val split; its ground truth is what is matched), --slots slots.png over
every image of a split or of --images.
"""

import math
import os
import sys
from json import loads

import torch
from PIL import ImageDraw
from torchvision.ops import box_convert

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from additions.loss import AdditionsMatcher
from additions.model import model_args
from configurator import configure, device_problem
from data.format import displayed_size
from data.pipeline import DetectionDataset, read_image, val_transform
from detr import parameters_by_part
from lib.draw import class_colour, draw_boxes, for_display, pyplot, save_figure
from lib.inference import ImageFiles, predict, run_dtype
from sample import image_paths, load, split_images, split_json

# defaults, each overridable as --key=value; one of --log, --weights, --matching and --slots says what to draw
log = ""  # a log.jsonl: draw its training curves (curves.png)
weights = False  # draw the checkpoint's weight histograms, one per part of the model (weights.png)
matching = False  # draw the bipartite matching of queries to objects (paper §3.1) on images of a split
slots = False  # draw every box each query slot predicts over a split (paper Fig. 7): slots.png
ckpt = "out-shapes/ckpt.pt"  # --weights, --matching, --slots: any model sample.py takes
split = ""  # --matching, --slots: a split of a prepared dataset (val, train ...); empty: the checkpoint's val split
dataset = ""  # with --split: a prepared dataset (a name under data/ or a folder); empty: the checkpoint's own
images = ""  # --slots: an image file or a folder of them instead of a split
num_slots = 0  # --slots: the first this many slots, one panel each; 0: 20 as the paper (all of a model with fewer)
max_images = 8  # --matching: images drawn
out_dir = "samples"  # where the pictures go
device = "cpu"  # cpu, or cuda

SMALL_BOX = 0.25  # --slots: a box narrower and lower than this share of the image is small (the paper's green)


def plot_log(log_path, out_path):
    """Training curves of a log.jsonl, one panel per question a run raises, each titled with what it shows
    and why it matters: the losses (with the additions' own terms where present), learning rate, val mAP,
    and the diagnostics of lib.run.training_diagnostics (gradient and weight norms per part, how alike the
    queries are: DETR's early plateau is where they all agree, and the matched boxes' IoU by layer). One
    colour per series across the figure, the legends beside the data."""
    plt = pyplot()
    if not os.path.isfile(log_path):
        raise SystemExit(f"error: no log file {log_path}")
    with open(log_path) as f:
        records = [loads(line) for line in f if line.strip()]
    parts = list(dict.fromkeys(k.removeprefix("grad_norm_") for r in records for k in r if k.startswith("grad_norm_")))
    ious = sorted(dict.fromkeys(k for r in records for k in r if k.startswith("iou_")), key=iou_order)
    panels = [  # (title: what it shows, and why it matters; keys; log scale)
        ("total loss\n(what the optimizer lowers)", ["loss"], False),
        ("classification loss\n(enc: encoder proposals, dn: denoising)", ["loss_ce", "loss_ce_enc", "loss_ce_dn"],
         False),
        ("L1 box loss\n(box coordinates, image fractions)", ["loss_bbox", "loss_bbox_enc", "loss_bbox_dn"], False),
        ("GIoU box loss\n(box overlap: 0 is perfect)", ["loss_giou", "loss_giou_enc", "loss_giou_dn"], False),
        ("learning rate\n(warm-up, then the drop or the cosine)", ["lr"], True),
        ("val mAP\n(what best.pt keeps the best of)", ["val_mAP50", "val_mAP50_07", "val_mAP"], False),
        ("gradient norm per part, before clipping\n(which part the loss pulls on)", [f"grad_norm_{p}" for p in parts],
         True),
        ("weight norm per part\n(a part that never moves is not learning)", [f"weight_norm_{p}" for p in parts], True),
        ("distinct classes the queries predict in an image\n(1: every query says the same, DETR's plateau)",
         ["query_classes"], False),
        ("box centres' spread, in image widths: across an image's queries,\n"
         "and of each query across images (near 0: the plateau)", ["query_box_spread", "query_box_image_std"], False),
        ("matched boxes' IoU with their objects, by layer\n"
         "(rising layer to layer: the decoder refines; dashed: denoising)", ious, False),
    ]
    # saturated colours, each series of a panel its own, in the same order in every panel (the decoder's loss
    # term, the proposals', the denoising's; the parts of the model in both norm panels)
    palette = [*plt.get_cmap("tab10").colors, "black", "navy", "maroon", "teal", "darkgoldenrod", "forestgreen"]
    plt.rcParams.update({"font.size": 12})
    fig, axes = plt.subplots(3, 4, figsize=(26, 16))
    for ax, (title, keys, log_scale) in zip(axes.flat, panels):
        same = [k.replace("iou_dn_", "iou_") for k in keys]  # a denoising layer takes its layer's colour, dashed
        for key, slot in zip(keys, same):
            points = [(r["iter"], r[key]) for r in records if key in r]
            if points:
                ax.plot(*zip(*points), label=short_key(key), color=palette[same.index(slot) % len(palette)],
                        marker="o" if key.startswith("val") else None,
                        linestyle="--" if key.startswith("iou_dn") else "-")
        ax.set_title(title, fontsize=12)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if ax.lines:
            if len(ax.lines) > 1:
                ax.legend(fontsize=10, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
            if log_scale:
                ax.set_yscale("log")
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    return save_figure(fig, out_path, f"{len(records)} log records")


def short_key(key):
    """A series' name in a legend: the part, the loss term or the layer, without its panel's prefix."""
    return key.removeprefix("grad_norm_").removeprefix("weight_norm_").removeprefix("iou_")


def iou_order(key):
    """iou_start, iou_layer_0, iou_layer_1, ..., then the same for iou_dn_*: the order boxes are refined in."""
    name = key.removeprefix("iou_")
    layer = int(name.rsplit("_", 1)[-1]) if name[-1].isdigit() else -1
    return name.startswith("dn"), name.removeprefix("dn_") != "start", layer


def plot_weights(model, out_path):
    """One histogram of weight values per part of the model (detr.parameters_by_part), on a log count scale."""
    plt = pyplot()
    named = parameters_by_part(model)
    columns, rows = 4, math.ceil(len(named) / 4)
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3 * rows), squeeze=False)
    for ax, (name, params) in zip(axes.flat, named.items()):
        values = torch.cat([p.detach().float().flatten() for p in params]).numpy()
        ax.hist(values, bins=100, log=True)
        ax.set_title(f"{name}: {values.size:,} weights, std {values.std():.3g}", fontsize=9)
    for ax in axes.flat[len(named) :]:
        ax.axis("off")
    return save_figure(fig, out_path, f"{len(named)} parts")


def draw_matching(model, data, index, cost_weights, path, device="cpu"):
    """The bipartite matching of one image (paper §3.1, Eq. 1), as the loss computes it in training:
    on the left the ground truth (thick, its class's colour) and the query matched to each object
    (thin, white), a line from each query's box centre to its object's; on the right the matching cost of
    every query against every object, then its three weighted terms (class, L1, GIoU), the Hungarian
    choice marked on each. cost_weights: (cost_class, cost_bbox, cost_giou) of the model's training."""
    from train import HungarianMatcher  # the training loss's own matcher, not a copy

    plt = pyplot()
    pixels = read_image(data.paths[index])  # None (logged) for an image that cannot be decoded
    if pixels is None:
        return None
    image, target = data.make_sample(index, pixels)
    if not len(target["labels"]):
        print(f"skip: {data.paths[index]} has no objects to match")
        return None
    with torch.no_grad():
        outputs = model(image[None].to(device))
    outputs = {k: outputs[k].float().cpu() for k in ("pred_logits", "pred_boxes")}
    targets = [{"labels": target["labels"], "boxes": target["boxes"]}]
    # the additions' matcher is the paper's but for a sigmoid class head's focal cost (additions/loss.py)
    matcher = AdditionsMatcher(HungarianMatcher(*cost_weights), sigmoid=model_args(model)["cls_loss"] != "ce")
    ((queries, objects),) = matcher(outputs, targets)
    parts = [p[0, 0].T for p in matcher.cost(outputs, targets, parts=True)]  # (T, Q) each: objects x queries
    picture, scale = for_display(pixels)
    H, W = pixels.shape[-2:]
    size = torch.tensor([W, H, W, H]) * scale

    gt_boxes = box_convert(target["boxes"], "cxcywh", "xyxy") * size  # the picture's pixels
    query_boxes = box_convert(outputs["pred_boxes"][0, queries], "cxcywh", "xyxy") * size
    colours = [class_colour(l) for l in target["labels"][objects].tolist()]
    logits = outputs["pred_logits"][0, queries]
    probs = model.class_probabilities(logits)[torch.arange(len(queries)), target["labels"][objects]]
    width = max(2, min(picture.size) // 200)
    # the objects in their class's colour (thick), the queries matched to them in white (thin)
    texts = ([f"object {j}: {model.classes[target['labels'][j]]}" for j in objects.tolist()]
             + [f"query {q} -> object {j} (p={p:.2f})"
                for q, j, p in zip(queries.tolist(), objects.tolist(), probs.tolist())])
    draw_boxes(picture, torch.cat([gt_boxes[objects], query_boxes]), texts, colours + [(255, 255, 255)] * len(queries),
               [2 * width] * len(objects) + [width] * len(queries))
    draw = ImageDraw.Draw(picture)
    for g, q in zip(gt_boxes[objects].tolist(), query_boxes.tolist()):  # query centre -> object centre, on top
        ends = [((q[0] + q[2]) / 2, (q[1] + q[3]) / 2), ((g[0] + g[2]) / 2, (g[1] + g[3]) / 2)]
        draw.line(ends, fill="black", width=width + 2)
        draw.line(ends, fill="white", width=width)
        for (x, y), fill in zip(ends, ("white", "black")):  # white dot: the query's centre; black: the object's
            draw.ellipse((x - 2 * width, y - 2 * width, x + 2 * width, y + 2 * width), fill=fill, outline="black")

    fig = plt.figure(figsize=(20, 9))
    layout = fig.add_gridspec(4, 2, width_ratios=[1, 1.8])
    ax = fig.add_subplot(layout[:, 0])
    ax.imshow(picture)
    ax.set_title(f"{os.path.basename(data.paths[index])}: objects (thick) and the queries matched to them (white)")
    ax.axis("off")
    names = [f"matching cost: {cost_weights[0]:g} class + {cost_weights[1]:g} L1 + {cost_weights[2]:g} GIoU "
             "(red squares: the Hungarian choice, the lowest total over one-to-one pairings)",
             f"class: -{cost_weights[0]:g} p(class of the object)", f"L1: {cost_weights[1]:g} |box - object's box|",
             f"GIoU: -{cost_weights[2]:g} GIoU(box, object's box)"]
    for row, (name, cost) in enumerate(zip(names, [sum(parts)] + parts)):
        ax = fig.add_subplot(layout[row, 1])
        shown = ax.imshow(cost.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
        ax.plot(queries.numpy(), objects.numpy(), "s", markerfacecolor="none", markeredgecolor="red", markersize=9,
                markeredgewidth=2)
        ax.set_title(name, fontsize=10)
        if cost.shape[1] <= 40:  # every query numbered where the numbers fit
            ax.set_xticks(range(cost.shape[1]))
        ax.set_ylabel("object")
        ax.set_yticks(range(len(target["labels"])))
        fig.colorbar(shown, ax=ax, pad=0.01)
    ax.set_xlabel("query")
    return save_figure(fig, path, f"{len(queries)} matched queries of {outputs['pred_logits'].shape[1]}")


def draw_slots(model, paths, n, path, device="cpu"):
    """The paper's Fig. 7: for each of the first n query slots, every box it predicts over the images, whatever
    its score, as a point at the box's centre in the image's unit square, green for a small box, red for a
    large wide one, blue for a large tall one: DETR's queries become specialised positions and sizes."""
    plt = pyplot()
    model.to(device)
    predictions = predict(model, ImageFiles(paths, model), device, dtype=run_dtype(model, device))
    if not predictions:
        raise SystemExit(f"error: none of the {len(paths)} images could be read")
    columns = min(5, n)
    rows = math.ceil(n / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.7 * rows + 1.2), squeeze=False)
    kinds = {"small": "tab:green", "large, wide": "tab:red", "large, tall": "tab:blue"}
    unit = {}  # each image's boxes (Q, 4) as fractions of its displayed size
    for i, p in predictions.items():
        width, height = displayed_size(paths[i])
        unit[i] = p["boxes"] / torch.tensor([width, height, width, height])
    for slot, ax in enumerate(axes.flat):
        if slot >= n:
            ax.axis("off")
            continue
        points = {kind: [] for kind in kinds}
        for boxes in unit.values():
            x0, y0, x1, y1 = boxes[slot].tolist()
            w, h = x1 - x0, y1 - y0
            kind = "small" if max(w, h) < SMALL_BOX else "large, wide" if w >= h else "large, tall"
            points[kind].append(((x0 + x1) / 2, (y0 + y1) / 2))
        for kind, colour in kinds.items():
            if points[kind]:
                ax.scatter(*zip(*points[kind]), s=6, color=colour, alpha=0.6, linewidths=0)
        ax.set_xlim(0, 1)
        ax.set_ylim(1, 0)  # image rows go down
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"slot {slot}", fontsize=11)
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=c, label=k) for k, c in kinds.items()]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=11, frameon=False,
               title=f"the box's centre in the image, by its size (small: under {SMALL_BOX:g} of the image each way)")
    fig.suptitle(f"What each query slot predicts over {len(predictions)} images (paper Fig. 7): every prediction, "
                 f"whatever its score", fontsize=13)
    return save_figure(fig, path, f"{n} query slots over {len(predictions)} images", rect=(0, 0.08, 1, 0.96))


def main():
    if log:
        plot_log(log, os.path.join(out_dir, "curves.png"))
        return
    model, config = load(ckpt)
    if weights:
        plot_weights(model, os.path.join(out_dir, "weights.png"))
        return
    path = split_json(config, split or config.get("val_split", "val"), dataset)
    if slots:
        if num_slots > model.num_queries:
            raise SystemExit(f"error: --num_slots={num_slots} but the model has {model.num_queries} query slots")
        paths = image_paths(images, path, model.classes)
        draw_slots(model, paths, num_slots or min(20, model.num_queries), os.path.join(out_dir, "slots.png"), device)
        return
    split_images(path, model.classes, hint="")  # one error line for no such split, or other classes
    data = DetectionDataset(path, val_transform(config["val_scale"], config["max_size"]))
    model.to(device).eval()
    cost_weights = tuple(config.get(k, default) for k, default in (("cost_class", 1.0), ("cost_bbox", 5.0),
                                                                   ("cost_giou", 2.0)))
    for i in range(min(max_images, len(data))):
        name = os.path.splitext(os.path.basename(data.paths[i]))[0]
        draw_matching(model, data, i, cost_weights, os.path.join(out_dir, f"{name}_matching.png"), device)


if __name__ == "__main__":
    flags = ("log", "weights", "matching", "slots", "ckpt", "split", "dataset", "images", "num_slots", "max_images",
             "out_dir", "device")
    globals().update(configure({k: globals()[k] for k in flags}, sys.argv[1:]))
    if [bool(log), weights, matching, slots].count(True) != 1:
        sys.exit("error: give one of --log=PATH, --weights, --matching or --slots")
    if max_images < 1 or num_slots < 0:
        sys.exit("error: --max_images must be >= 1, --num_slots >= 0")
    if split and (images or not (matching or slots)):
        sys.exit("error: --split=NAME takes the images of that split for --matching or --slots, instead of --images")
    if matching and images:
        sys.exit("error: --matching needs the ground truth of a prepared split (--split=NAME, else the checkpoint's "
                 "val split), not --images")
    if device_problem(device):
        sys.exit(f"error: {device_problem(device)}")
    try:  # every picture goes there
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        sys.exit(f"error: cannot write to --out_dir={out_dir} ({e.strerror})")
    main()
