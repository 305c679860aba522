"""
Look at what a DETR sees: its detections drawn on images, what each detection's object query attends
to (paper Fig. 6), what the encoder attends to from a few pixels (paper Fig. 3), what each query slot
predicts (paper Fig. 7), and training curves. Also the Python API and detections as data:

    import sample
    from lib import weights
    model = weights.load_model("out-shapes/best.pt")[0]
    for d in sample.detect(model, ["photo.jpg"], threshold=0.5):   # run as the model's run evaluated
        d["boxes"], d["scores"], d["labels"], d["names"]              # xyxy pixels of the displayed image

    python sample.py --ckpt=out-shapes/ckpt.pt                        # a few val images of that run
    python sample.py --ckpt=out-voc/best.pt --images=photos/ --attention
    python sample.py --ckpt=detr-r50 --images=street.jpg              # the official COCO model
    python sample.py --ckpt=facebook/detr-resnet-50 --images=street.jpg   # a transformers DETR (hub id or folder)
    python sample.py --log=out-shapes/log.jsonl                       # training curves (needs matplotlib)
    python sample.py --ckpt=out-shapes/ckpt.pt --weights              # weight histograms (needs matplotlib)
    python sample.py --ckpt=detr-r50 --images=photos/ --json=detections.json   # detections as data
    python sample.py --ckpt=out-custom/best.pt --split=val --json=detections.json  # ... with the dataset's own ids
    python sample.py --ckpt=out-shapes/best.pt --matching             # which query was matched to which object (§3.1)
    python sample.py --ckpt=out-shapes/best.pt --slots                # every box of each query slot over val (Fig. 7)

One PNG per image goes to out_dir (<name>.png; with --attention also <name>_attention.png); --log
writes out_dir/curves.png, --weights out_dir/weights.png, --slots out_dir/slots.png, --matching
<name>_matching.png per image (needs matplotlib). Small images are drawn upscaled (MIN_SIDE). --json draws nothing: it runs batched
inference over every image of --images and writes one COCO results record per detection: every one,
up to the model's max_dets per image and class, as COCO's evaluation counts them (so pycocotools on the
file gives tools/eval.py's mAP), or, given --threshold or --top_k, those above it or the top_k best per
image: image_id (for a folder, the image's index in sorted
file order; with --split, a split of the checkpoint's dataset or of --dataset (classes matched by
name), the dataset's own image id, as a COCO json gave it, so that pycocotools scores the file against that json), file_name (relative to the
folder or the split's json), category_id (the dataset's own ids where the checkpoint or the split has
them; COCO's for the official models), bbox [x, y, w, h] in the original image's pixels, and score.
"""

import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torchvision.ops import box_convert

from json import dump, loads  # the name json is the --json flag's

from lib import metrics
from configurator import configure, device_problem
from data.format import IMAGE_EXTENSIONS, displayed_size, read_dataset_json
from data.pipeline import DetectionDataset, dataset_dir, read_image, val_transform
from detr import parameters_by_part
from lib.draw import class_colour, draw_boxes, for_display, pyplot, save_figure, text_font
from lib.inference import ImageFiles, autocast, class_map, predict, run_dtype
from lib.weights import LoadError, load_model

# defaults, each overridable as --key=value
ckpt = "out-shapes/ckpt.pt"  # a minidetr checkpoint, an official one (file, or 'detr-r50' ...), or a transformers folder / hub id
images = ""  # an image file or a folder of them; empty: the checkpoint's val split
split = ""  # instead of --images: a split of a prepared dataset (val, train ...), with its own image and category ids
dataset = ""  # with --split: a prepared dataset (a name under data/ or a folder); empty: the checkpoint's own
out_dir = "samples"  # where the pictures go
device = "cpu"  # cpu, or cuda
threshold = 0.7  # draw detections whose class probability is above this (with --json: only when given)
max_images = 8  # images drawn (and with --matching, matched)
json = ""  # --json=PATH: write the detections of every image of --images to PATH instead of drawing
top_k = 0  # with --json: keep the top_k detections per image instead of every one
batch_size = 0  # images per forward pass; 0: the checkpoint's own (the official models': 2), padded as it was (lib/inference.py says why)
attention = False  # also draw the attention maps of every kept detection
num_pixels = 4  # encoder self-attention is shown from this many pixels (the centres of detections)
log = ""  # a log.jsonl: draw its training curves instead of sampling
weights = False  # draw the checkpoint's weight histograms, one per part of the model, instead of sampling
matching = False  # draw the bipartite matching of queries to objects (paper §3.1) on images of a split (--split, else val)
slots = False  # draw every box each query slot predicts over a split (paper Fig. 7): slots.png
num_slots = 0  # --slots: the first this many slots, one panel each; 0: 20 as the paper (every slot of a model with fewer)

def split_json(config, split, dataset=""):
    """A split's json of a prepared dataset, by default a minidetr checkpoint's own (weights.load_model's
    config), else None: only a minidetr checkpoint names its dataset."""
    name = dataset or config.get("dataset")
    return os.path.join(dataset_dir(name), f"{split}.json") if name else None


def split_images(split_path, classes=None, hint="give --images=path, or "):
    """A prepared split's image paths, the dataset's own image ids (its json's "id", else the index), its
    classes and category ids (or None), or one error line: no such split, or (given classes) others."""
    if split_path is None or not os.path.isfile(split_path):
        raise SystemExit(f"error: {hint}--split=NAME of a prepared split (--dataset, else the checkpoint's own; no split "
                         f"{split_path or 'of a minidetr checkpoint'})")
    data = read_dataset_json(split_path)
    if classes is not None and data["classes"] != classes:
        raise SystemExit(f"error: {split_path} has classes {data['classes']}, the checkpoint {classes}")
    root = os.path.dirname(os.path.abspath(split_path))
    return ([os.path.join(root, r["file"]) for r in data["images"]], [r.get("id", i) for i, r in enumerate(data["images"])],
            data["classes"], data.get("category_ids"))


def image_paths(images, val_json, classes):
    """The images to sample: a file, a folder's images, or the first ones of the val split."""
    if not images:
        return split_images(val_json, classes)[0]
    if os.path.isdir(images):
        paths = sorted(os.path.join(images, f) for f in os.listdir(images) if f.lower().endswith(IMAGE_EXTENSIONS))
        if not paths:
            raise SystemExit(f"error: no images ({', '.join(IMAGE_EXTENSIONS)}) in {images}")
        return paths
    if not os.path.isfile(images):
        raise SystemExit(f"error: no image or folder at {images}")
    return [images]


def detect(model, images, threshold=0.5, device="cpu", top_k=0, num_workers=0):
    """The Python API: the detections of a model (weights.load_model's) on images, run as its training
    run evaluated them (inference.predict). images: file paths or PIL images, as displayed (EXIF applied).
    Returns one dict per image: boxes (N, 4) xyxy in the displayed image's pixels, scores (N,) above
    threshold (or the top_k best), labels (N,) and names (N,), surest first; None for a file that cannot
    be read (logged)."""
    model.to(device)
    data = ImageFiles(images, model)
    predictions = predict(model, data, device, dtype=run_dtype(model, device), num_workers=num_workers)
    classes = model.classes or [f"class {k}" for k in range(model.num_classes)]
    found = []
    for i in range(len(data)):
        if i not in predictions:
            found.append(None)
            continue
        p = predictions[i]
        order = p["scores"].argsort(descending=True)
        keep = order[:top_k] if top_k else order[p["scores"][order] > threshold]
        found.append({**{k: p[k][keep] for k in ("boxes", "scores", "labels")},
                      "names": [classes[label] for label in p["labels"][keep].tolist()]})
    return found


def write_json(model, paths, root, out_path, image_ids=None, category_ids=None, threshold=None, top_k=0, device="cpu",
               max_dets=100):
    """--json: detect over paths, and write each kept detection as a COCO results record (see the
    docstring) to out_path. threshold None (and no top_k): every detection, up to max_dets per image and
    class, what COCO's AP counts. image_ids: each path's, else its index; category_ids: each output's id in
    the dataset, -1 to leave its detections out (a class the dataset lacks), else the label."""
    start = time.perf_counter()
    found = detect(model, paths, -1.0 if threshold is None else threshold, device, top_k,  # -1: every score passes
                   num_workers=min(4, os.cpu_count() or 1))
    records = []
    for i, d in enumerate(found):
        if d is None:  # unreadable (logged)
            continue
        if threshold is None and not top_k:  # each class's max_dets surest (detect sorts them surest first)
            keep = metrics.top_of_each_class(d["labels"], max_dets)
            d = {k: d[k][keep] for k in ("boxes", "scores", "labels")}
        for record in metrics.coco_results([d], [i if image_ids is None else image_ids[i]], category_ids):
            if record["category_id"] != -1:
                records.append({"file_name": os.path.relpath(paths[i], root), **record})
    read = sum(d is not None for d in found)
    if not read:
        raise SystemExit(f"error: none of the {len(paths)} images could be read")
    with open(out_path, "w") as f:
        dump(records, f)
    print(f"{len(records)} detections of {read} images ({read / (time.perf_counter() - start):.1f} images/s) -> {out_path}")
    return records


def draw_detections(image, result, classes, threshold):
    """image (3, H, W) uint8; result: one postprocess dict. Returns the drawn PIL picture (upscaled as
    for_display) and the kept query ids, surest first."""
    picture, scale = for_display(image)
    keep = torch.nonzero(result["scores"] > threshold).flatten()
    keep = keep[result["scores"][keep].argsort(descending=True)]
    labels = result["labels"][keep].tolist()
    names = [f"{classes[l]} {s:.2f}" for l, s in zip(labels, result["scores"][keep].tolist())]
    draw_boxes(picture, result["boxes"][keep] * scale, names, [class_colour(l) for l in labels])
    return picture, keep


def attention_maps(weights, size):
    """Attention weights of one image (heads, L, hw) -> (L, h, w), averaged over heads (each row sums to 1)."""
    return weights.mean(0).reshape(-1, *size)


def heat_overlay(picture, heat):
    """Blend a (h, w) map, upsampled to the picture and scaled to [0, 1], over a PIL picture; a new picture."""
    image = torch.from_numpy(np.array(picture.convert("RGB"))).permute(2, 0, 1)
    H, W = image.shape[-2:]
    heat = F.interpolate(heat[None, None].float(), size=(H, W), mode="bilinear", align_corners=False)[0, 0]
    heat = (heat - heat.min()) / (heat.max() - heat.min() + 1e-12)
    # a small "hot" colour map: black -> red -> yellow -> white
    colour = torch.stack([(3 * heat).clamp(0, 1), (3 * heat - 1).clamp(0, 1), (3 * heat - 2).clamp(0, 1)]) * 255
    blended = (0.35 * image.float() + 0.65 * colour).to(torch.uint8)
    return Image.fromarray(blended.permute(1, 2, 0).numpy())


def grid(panels, titles, columns=4):
    """Paste PIL panels (all of one size) with a title line above each into one PIL image."""
    W, H = panels[0].size
    font = text_font(panels[0])
    band = font.size + 10  # the title line's height
    rows = math.ceil(len(panels) / columns)
    columns = min(columns, len(panels))
    sheet = Image.new("RGB", (columns * W, rows * (H + band)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (panel, title) in enumerate(zip(panels, titles)):
        x, y = (i % columns) * W, (i // columns) * (H + band)
        sheet.paste(panel, (x, y + band))
        draw.text((x + 4, y + 4), title, fill="black", font=font)
    return sheet


def sample(model, paths, out_dir, threshold=0.7, device="cpu", attention=False, num_pixels=4):
    """Draw the detections above threshold on each image into out_dir (and, with attention, what they
    attend to: draw_attention)."""
    os.makedirs(out_dir, exist_ok=True)
    model.to(device)
    predictions = predict(model, ImageFiles(paths, model), device, dtype=run_dtype(model, device))
    written = []
    for i in sorted(predictions):
        pixels, result = read_image(paths[i]), predictions[i]
        drawn, keep = draw_detections(pixels, result, model.classes, threshold)
        name = os.path.splitext(os.path.basename(paths[i]))[0]
        drawn.save(os.path.join(out_dir, f"{name}.png"))
        written.append(os.path.join(out_dir, f"{name}.png"))
        print(f"{paths[i]}: {len(keep)} detections above {threshold} -> {written[-1]}")
        if attention:  # the attention of the queries kept, from a forward of the image alone (its own grid)
            x = ImageFiles(paths[i : i + 1], model)[0][0]
            with torch.no_grad(), autocast(device, run_dtype(model, device)):
                outputs = model.eval()(x[None].to(device), need_weights=True)
            written.append(draw_attention(pixels, outputs, result, drawn, keep, model.classes,
                                          os.path.join(out_dir, f"{name}_attention.png"), num_pixels))
    if not written:
        raise SystemExit(f"error: none of the {len(paths)} images could be read")
    return written


def draw_attention(pixels, outputs, result, drawn, keep, classes, path, num_pixels=4):
    """One grid per image: the detections (drawn), then per kept query (the 8 surest) its last decoder
    layer's cross-attention (paper Fig. 6), then the last encoder layer's self-attention from a few
    pixels (paper Fig. 3)."""
    size = outputs["feat_size"]
    decoder = attention_maps(outputs["dec_attn"][-1][0].cpu(), size)  # (Q, h, w)
    encoder = attention_maps(outputs["enc_attn"][-1][0].cpu(), size)  # (hw, h, w)
    picture, scale = for_display(pixels)
    panels, titles = [drawn], ["detections"]
    keep = keep[:8]  # the 8 surest, to keep the grid readable
    for q in keep.tolist():
        label = result["labels"][q].item()
        text = f"{classes[label]} {result['scores'][q]:.2f}"
        panels.append(draw_boxes(heat_overlay(picture, decoder[q]), result["boxes"][q : q + 1] * scale, [text],
                                 [class_colour(label)]))
        titles.append(f"query {q}: {text}")
    # encoder attention from the centres of the detections (or from a few spread pixels if none)
    H, W = pixels.shape[-2:]
    h, w = size
    if len(keep):
        centres = [((b[1] + b[3]) / 2, (b[0] + b[2]) / 2) for b in result["boxes"][keep].tolist()]
    else:
        centres = [(H * (i + 1) / (num_pixels + 1), W * (i + 1) / (num_pixels + 1)) for i in range(num_pixels)]
    for cy, cx in centres[:num_pixels]:
        r, c = min(int(cy / H * h), h - 1), min(int(cx / W * w), w - 1)
        panel = heat_overlay(picture, encoder[r * w + c])
        radius = max(3, min(panel.size) // 100)
        ImageDraw.Draw(panel).ellipse((cx * scale - radius, cy * scale - radius, cx * scale + radius, cy * scale + radius),
                                      fill="cyan", outline="black")
        panels.append(panel)
        titles.append(f"encoder, from pixel ({int(cx)}, {int(cy)})")
    grid(panels, titles).save(path)
    return path


def draw_matching(model, data, index, cost_weights, path, device="cpu"):
    """The bipartite matching of one image (paper §3.1, Eq. 1), as the loss computes it in training:
    on the left the ground truth (thick, its class's colour) and the query matched to each object
    (thin, white), a line from each query's box centre to its object's; on the right the matching cost of every query
    against every object, then its three weighted terms (class, L1, GIoU), the Hungarian choice
    marked on each. cost_weights: (cost_class, cost_bbox, cost_giou) of the model's training."""
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
    matcher = HungarianMatcher(*cost_weights, sigmoid=model.sigmoid_classes)
    ((queries, objects),) = matcher(outputs, targets)
    parts = [p[0, 0].T for p in matcher.cost(outputs, targets, parts=True)]  # (T, Q) each: objects x queries
    picture, scale = for_display(pixels)
    H, W = pixels.shape[-2:]
    size = torch.tensor([W, H, W, H]) * scale

    gt_boxes = box_convert(target["boxes"], "cxcywh", "xyxy") * size  # the picture's pixels
    query_boxes = box_convert(outputs["pred_boxes"][0, queries], "cxcywh", "xyxy") * size
    colours = [class_colour(l) for l in target["labels"][objects].tolist()]
    logits = outputs["pred_logits"][0, queries]
    probs = (logits.sigmoid() if model.sigmoid_classes else logits.softmax(-1))[torch.arange(len(queries)), target["labels"][objects]]
    width = max(2, min(picture.size) // 200)
    # the objects in their class's colour (thick), the queries matched to them in white (thin)
    texts = ([f"object {j}: {model.classes[target['labels'][j]]}" for j in objects.tolist()]
             + [f"query {q} -> object {j} (p={p:.2f})" for q, j, p in zip(queries.tolist(), objects.tolist(), probs.tolist())])
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


def plot_log(log_path, out_path):
    """Training curves of a log.jsonl, one panel per question a run raises, each titled with what it shows
    and why it matters: the losses (with the additions' own terms where present), learning rate, val mAP,
    and the diagnostics of train.training_diagnostics (gradient and weight norms per part, how alike the
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
        ("classification loss\n(enc: encoder proposals, dn: denoising)", ["loss_ce", "loss_ce_enc", "loss_ce_dn"], False),
        ("L1 box loss\n(box coordinates, image fractions)", ["loss_bbox", "loss_bbox_enc", "loss_bbox_dn"], False),
        ("GIoU box loss\n(box overlap: 0 is perfect)", ["loss_giou", "loss_giou_enc", "loss_giou_dn"], False),
        ("learning rate\n(warm-up, then the drop or the cosine)", ["lr"], True),
        ("val mAP\n(what best.pt keeps the best of)", ["val_mAP50", "val_mAP50_07", "val_mAP"], False),
        ("gradient norm per part, before clipping\n(which part the loss pulls on)", [f"grad_norm_{p}" for p in parts], True),
        ("weight norm per part\n(a part that never moves is not learning)", [f"weight_norm_{p}" for p in parts], True),
        ("distinct classes the queries predict in an image\n(1: every query says the same, DETR's plateau)",
         ["query_classes"], False),
        ("box centres' spread, in image widths: across an image's queries,\nand of each query across images (near 0: the plateau)",
         ["query_box_spread", "query_box_image_std"], False),
        ("matched boxes' IoU with their objects, by layer\n(rising layer to layer: the decoder refines; dashed: denoising)",
         ious, False),
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
                        marker="o" if key.startswith("val") else None, linestyle="--" if key.startswith("iou_dn") else "-")
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


SMALL_BOX = 0.25  # --slots: a box narrower and lower than this share of the image is small (the paper's green)


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


def short_key(key):
    """A series' name in a legend: the part, the loss term or the layer, without its panel's prefix."""
    return key.removeprefix("grad_norm_").removeprefix("weight_norm_").removeprefix("iou_")


def iou_order(key):
    """iou_start, iou_layer_0, iou_layer_1, ..., then the same for iou_dn_*: the order boxes are refined in."""
    name = key.removeprefix("iou_")
    return name.startswith("dn"), name.removeprefix("dn_") != "start", int(name.rsplit("_", 1)[-1]) if name[-1].isdigit() else -1


def plot_weights(model, out_path):
    """One histogram of weight values per part of the model (detr.parameters_by_part), on a log count scale."""
    plt = pyplot()
    named = parameters_by_part(model)
    columns = 4
    fig, axes = plt.subplots(math.ceil(len(named) / columns), columns, figsize=(4 * columns, 3 * math.ceil(len(named) / columns)),
                             squeeze=False)
    for ax, (name, params) in zip(axes.flat, named.items()):
        values = torch.cat([p.detach().float().flatten() for p in params]).numpy()
        ax.hist(values, bins=100, log=True)
        ax.set_title(f"{name}: {values.size:,} weights, std {values.std():.3g}", fontsize=9)
    for ax in axes.flat[len(named) :]:
        ax.axis("off")
    return save_figure(fig, out_path, f"{len(named)} parts")


def main(given=()):
    """given: the flags the command line set (--json writes every detection unless --threshold is one)."""
    if log:
        plot_log(log, os.path.join(out_dir, "curves.png"))
        return
    try:
        model, config = load_model(ckpt)
    except LoadError as e:
        raise SystemExit(f"error: {e}")
    if model.classes is None:  # an official-format file of a model fine-tuned elsewhere: its outputs by number
        model.classes = [f"class {i}" for i in range(model.num_classes)]
    val_scale, max_size = config["val_scale"], config["max_size"]
    json_threshold, max_dets = threshold if "threshold" in given else None, config.get("max_dets", 100)
    if batch_size:
        model.eval_config["batch_size"] = batch_size
    if weights:
        plot_weights(model, os.path.join(out_dir, "weights.png"))
        return
    if slots:
        if num_slots > model.num_queries:
            raise SystemExit(f"error: --num_slots={num_slots} but the model has {model.num_queries} query slots")
        paths = image_paths(images, split_json(config, split or config.get("val_split", "val"), dataset), model.classes)
        draw_slots(model, paths, num_slots or min(20, model.num_queries), os.path.join(out_dir, "slots.png"), device)
        return
    if matching:
        path = split_json(config, split or config.get("val_split", "val"), dataset)
        split_images(path, model.classes, hint="")  # one error line for no such split, or other classes
        data = DetectionDataset(path, val_transform(val_scale, max_size))
        model.to(device).eval()
        cost_weights = tuple(config.get(k, default) for k, default in (("cost_class", 1.0), ("cost_bbox", 5.0), ("cost_giou", 2.0)))
        os.makedirs(out_dir, exist_ok=True)
        for i in range(min(max_images, len(data))):
            name = os.path.splitext(os.path.basename(data.paths[i]))[0]
            draw_matching(model, data, i, cost_weights, os.path.join(out_dir, f"{name}_matching.png"), device)
        return
    if json and split:  # a prepared split: the dataset's own image and category ids, its classes matched by name
        path = split_json(config, split, dataset)
        paths, image_ids, classes, category_ids = split_images(path)
        ids = class_map(model, classes).tolist()  # each output's dataset class, -1 for none
        ids = [c if c < 0 or category_ids is None else category_ids[c] for c in ids]
        write_json(model, paths, os.path.dirname(path), json, image_ids, ids, json_threshold, top_k, device, max_dets)
        return
    if json:
        if not images:
            raise SystemExit("error: --json needs --images=DIR (or one image file), or --split=NAME of the checkpoint's dataset")
        paths = image_paths(images, None, model.classes)
        root = images if os.path.isdir(images) else os.path.dirname(images)
        write_json(model, paths, root, json, None, model.category_ids, json_threshold, top_k, device, max_dets)
        return
    paths = image_paths(images, split_json(config, config.get("val_split")), model.classes)
    sample(model, paths[:max_images], out_dir, threshold, device, attention, num_pixels)


if __name__ == "__main__":
    flags = ("ckpt", "images", "out_dir", "device", "threshold", "max_images", "attention", "num_pixels", "log",
             "weights", "json", "top_k", "batch_size", "split", "dataset", "matching", "slots", "num_slots")
    given = set()
    globals().update(configure({k: globals()[k] for k in flags}, sys.argv[1:], given=given))
    if not 0 <= threshold <= 1 or max_images < 1 or num_pixels < 1 or min(top_k, batch_size, num_slots) < 0:
        sys.exit("error: --threshold must be in [0, 1], --max_images and --num_pixels >= 1, --top_k, --batch_size and --num_slots >= 0")
    if json and not os.path.isdir(os.path.dirname(os.path.abspath(json))):
        sys.exit(f"error: no folder for --json={json}")
    if split and (images or not (json or matching or slots)):
        sys.exit("error: --split=NAME takes the images of that split for --json, --matching or --slots, instead of --images")
    if device_problem(device):
        sys.exit(f"error: {device_problem(device)}")
    try:
        if not json:  # every picture goes there
            os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        sys.exit(f"error: cannot write to --out_dir={out_dir} ({e.strerror})")
    if matching and (images or json or attention):
        sys.exit("error: --matching needs the ground truth of a prepared split (--split=NAME, else the checkpoint's val split): not --images, --json or --attention")
    main(given)
