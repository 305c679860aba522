"""
Look at what a DETR sees: its detections drawn on images, what each detection's object query attends
to (paper Fig. 6), what the encoder attends to from a few pixels (paper Fig. 3), and training curves.

    python sample.py --ckpt=out-shapes/ckpt.pt                        # a few val images of that run
    python sample.py --ckpt=out-voc/best.pt --images=photos/ --attention
    python sample.py --ckpt=detr-r50 --images=street.jpg              # the official COCO model
    python sample.py --ckpt=facebook/detr-resnet-50 --images=street.jpg   # a transformers DETR (hub id or folder)
    python sample.py --log=out-shapes/log.jsonl                       # training curves (needs matplotlib)
    python sample.py --ckpt=out-shapes/ckpt.pt --weights              # weight histograms (needs matplotlib)
    python sample.py --ckpt=detr-r50 --images=photos/ --json=detections.json   # detections as data
    python sample.py --ckpt=out-custom/best.pt --split=val --json=detections.json  # ... with the dataset's own ids
    python sample.py --ckpt=out-shapes/best.pt --matching             # which query was matched to which object (§3.1)

One PNG per image goes to out_dir (<name>.png; with --attention also <name>_attention.png); --log
writes out_dir/curves.png, --weights out_dir/weights.png, --matching <name>_matching.png per image
(needs matplotlib). Small images are drawn upscaled (MIN_SIDE). --json draws nothing: it runs batched
inference over every image of --images and writes one COCO results record per detection above
--threshold (or the --top_k best per image): image_id (for a folder, the image's index in sorted
file order; with --split, a split of the checkpoint's dataset, the dataset's own image id, as a COCO
json gave it, so that pycocotools scores the file against that json), file_name (relative to the
folder or the split's json), category_id (the dataset's own ids where the checkpoint or the split has
them; COCO's for the official models), bbox [x, y, w, h] in the original image's pixels, and score.
"""

import math
import os
import sys
import time
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torchvision.ops import box_convert

from json import dump, loads  # the name json is the --json flag's

import metrics
from configurator import configure, device_problem
from data.format import IMAGE_EXTENSIONS, read_dataset_json
from data.pipeline import DetectionDataset, collate, dataset_dir, read_image, val_transform
from detr import parameters_by_part, postprocess
from weights import LoadError, load_model

# defaults, each overridable as --key=value
ckpt = "out-shapes/ckpt.pt"  # a minidetr checkpoint, an official one (file, or 'detr-r50' ...), or a transformers folder / hub id
images = ""  # an image file or a folder of them; empty: the checkpoint's val split
split = ""  # instead of --images: a split of the checkpoint's dataset (val, train ...), with its own image and category ids
out_dir = "samples"
device = "cpu"
threshold = 0.7  # keep detections whose class probability is above this
max_images = 8
json = ""  # --json=PATH: write the detections of every image of --images to PATH instead of drawing
top_k = 0  # with --json: keep the top_k detections per image instead of those above threshold
batch_size = 0  # with --json: images per forward pass; 0: the checkpoint's own (else 8), padded as it was (eval.py's docstring says why)
attention = False  # also draw the attention maps of every kept detection
num_pixels = 4  # encoder self-attention is shown from this many pixels (the centres of detections)
log = ""  # a log.jsonl: draw its training curves instead of sampling
weights = False  # draw the checkpoint's weight histograms, one per part of the model, instead of sampling
matching = False  # draw the bipartite matching of queries to objects (paper §3.1) on images of a split (--split, else val)

def split_json(config, split):
    """A split's json of a minidetr checkpoint's dataset (weights.load_model's config), else None: only
    a minidetr checkpoint names its dataset."""
    if "dataset" not in config:
        return None
    return os.path.join(dataset_dir(config["dataset"]), f"{split}.json")


def split_images(split_path, classes):
    """A prepared split's image paths, the dataset's own image ids (its json's "id", else the index) and
    category ids (or None), or one error line: no such split, or other classes than the model's."""
    if split_path is None or not os.path.isfile(split_path):
        instead = "" if matching else "give --images=path, or "
        raise SystemExit(f"error: {instead}--split=NAME of a prepared split of the checkpoint's dataset (no split "
                         f"{split_path or 'of a minidetr checkpoint'})")
    data = read_dataset_json(split_path)
    if data["classes"] != classes:
        raise SystemExit(f"error: {split_path} has classes {data['classes']}, the checkpoint {classes}")
    root = os.path.dirname(os.path.abspath(split_path))
    return ([os.path.join(root, r["file"]) for r in data["images"]], [r.get("id", i) for i, r in enumerate(data["images"])],
            data.get("category_ids"))


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


class ImageFiles(torch.utils.data.Dataset):
    """Image files -> (image (3, h, w) normalised, {orig_size, index}); None for a file that cannot be
    decoded (logged, then dropped by the collate)."""

    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        pixels = read_image(self.paths[i])
        if pixels is None:
            return None
        return self.transform(pixels).float(), {"orig_size": torch.tensor(pixels.shape[-2:]), "index": i}


def collate_readable(batch, pad_to=1):
    """collate over the images that could be read; None when none could."""
    batch = [b for b in batch if b is not None]
    return collate(batch, pad_to) if batch else None


def detect(model, category_ids, val_scale, max_size, paths, root, out_path, image_ids=None, batch=8, pad_to=1):
    """Batched inference over paths, batch images at a time, padded to a multiple of pad_to; writes the
    kept detections as COCO results records (see the docstring; image_ids: each path's, else its
    index) to out_path and returns them."""
    from tqdm import tqdm

    transform = val_transform(val_scale, max_size)
    loader = torch.utils.data.DataLoader(
        ImageFiles(paths, transform), batch_size=batch, num_workers=min(4, os.cpu_count() or 1),
        collate_fn=partial(collate_readable, pad_to=pad_to))
    model.to(device).eval()
    records, read, start = [], 0, time.perf_counter()
    for batch in tqdm(loader, desc="detect", unit="batch", disable=len(paths) < 2 * batch):
        if batch is None:
            continue
        pixels, mask, targets = batch
        with torch.no_grad():
            outputs = model(pixels.to(device), None if mask is None else mask.to(device))
        results = postprocess(outputs, torch.stack([t["orig_size"] for t in targets]))
        for target, result in zip(targets, results):
            result = {k: v.cpu() for k, v in result.items()}
            keep = result["scores"].argsort(descending=True)[:top_k] if top_k else result["scores"] > threshold
            i = target["index"]
            image_id = i if image_ids is None else image_ids[i]
            for record in metrics.coco_results([{k: v[keep] for k, v in result.items()}], [image_id], category_ids):
                records.append({"file_name": os.path.relpath(paths[i], root), **record})
            read += 1
    if not read:
        raise SystemExit(f"error: none of the {len(paths)} images could be read")
    with open(out_path, "w") as f:
        dump(records, f)
    print(f"{len(records)} detections of {read} images ({read / (time.perf_counter() - start):.1f} images/s) -> {out_path}")
    return records


def class_colour(label):
    """A distinct, stable colour per class: hues spaced by the golden angle."""
    hue = (label * 0.618033988749895) % 1.0
    rgb = Image.new("HSV", (1, 1), (int(hue * 255), 200, 255)).convert("RGB").getpixel((0, 0))
    return rgb


MIN_SIDE = 512  # every picture is drawn with at least this short side: small images are upscaled first


def for_display(image):
    """(3, H, W) uint8 -> (the PIL image to draw on, upscaled to a short side of MIN_SIDE if smaller, the scale)."""
    H, W = image.shape[-2:]
    scale = max(1.0, MIN_SIDE / min(H, W))
    picture = Image.fromarray(image.permute(1, 2, 0).numpy())
    if scale > 1:
        picture = picture.resize((round(W * scale), round(H * scale)), Image.BILINEAR)
    return picture, scale


def text_font(picture):
    """A font sized to the picture (Pillow's own, scalable), so that labels stay readable on any image."""
    return ImageFont.load_default(size=max(12, min(picture.size) // 32))


def place_labels(boxes, sizes, picture_size):
    """Where each label goes, (x, y, w, h) in the order given (the surest first): at the first of a few
    places at its box's corners (above the top-left one first) that lies inside the picture and covers
    no earlier label, else at the one that covers least. So no label is cut off, and few sit on top
    of each other. boxes: (x0, y0, x1, y1) each; sizes: (w, h) each."""
    W, H = picture_size
    placed = []
    for (x0, y0, x1, y1), (w, h) in zip(boxes, sizes):
        candidates = [(x0, y0 - h), (x0, y0), (x0, y1), (x0, y1 - h), (x1 - w, y0 - h), (x1 - w, y1)]
        candidates = [(max(0, min(x, W - w)), max(0, min(y, H - h))) for x, y in candidates]  # inside, or from the left/top edge

        def covered(corner):
            x, y = corner
            return sum(max(0, min(x + w, a + c) - max(x, a)) * max(0, min(y + h, b + d) - max(y, b)) for a, b, c, d in placed)

        x, y = min(candidates, key=covered)  # min keeps the first of equals: the first free place
        placed.append((x, y, w, h))
    return placed


def draw_boxes(picture, boxes, texts, colours, widths=None):
    """Draw boxes (K, 4) xyxy in the picture's pixels (widths: their line widths, else one to suit the
    picture), each with its text on a label filled with its colour, after every box (place_labels)."""
    draw = ImageDraw.Draw(picture)
    font = text_font(picture)
    widths = widths or [max(2, min(picture.size) // 200)] * len(boxes)
    for (x0, y0, x1, y1), colour, width in zip(boxes.tolist(), colours, widths):
        draw.rectangle((x0 - 1, y0 - 1, x1 + 1, y1 + 1), outline="black", width=width + 2)  # a dark edge: seen on any background
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=width)
    extents = [draw.textbbox((0, 0), text, font=font) for text in texts]  # (left, top, right, bottom) each
    sizes = [(right - left + 6, bottom - top + 4) for left, top, right, bottom in extents]
    for (x, y, w, h), (left, top, _, _), text, colour in zip(place_labels(boxes.tolist(), sizes, picture.size), extents, texts, colours):
        draw.rectangle((x, y, x + w - 1, y + h - 1), fill=colour, outline="black")
        dark = sum(c * k for c, k in zip(colour, (0.299, 0.587, 0.114))) < 140
        draw.text((x + 3 - left, y + 2 - top), text, fill="white" if dark else "black", font=font)
    return picture


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


def sample(model, val_scale, max_size, paths):
    transform = val_transform(val_scale, max_size)
    model.to(device).eval()
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for path in paths[:max_images]:
        pixels = read_image(path)  # (3, H, W) uint8
        if pixels is None:
            continue
        x = transform(pixels)
        with torch.no_grad():
            outputs = model(x[None].float().to(device), need_weights=attention)
        (result,) = postprocess(outputs, [pixels.shape[-2:]])
        result = {k: v.cpu() for k, v in result.items()}
        drawn, keep = draw_detections(pixels, result, model.classes, threshold)
        name = os.path.splitext(os.path.basename(path))[0]
        drawn.save(os.path.join(out_dir, f"{name}.png"))
        written.append(os.path.join(out_dir, f"{name}.png"))
        print(f"{path}: {len(keep)} detections above {threshold} -> {written[-1]}")
        if attention:
            written.append(draw_attention(pixels, outputs, result, drawn, keep, model.classes, name))
    if not written:
        raise SystemExit(f"error: none of the {len(paths[:max_images])} images could be read")
    return written


def draw_attention(pixels, outputs, result, drawn, keep, classes, name):
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
    path = os.path.join(out_dir, f"{name}_attention.png")
    grid(panels, titles).save(path)
    return path


def draw_matching(model, data, index, cost_weights, path):
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
    matcher = HungarianMatcher(*cost_weights)
    ((queries, objects),) = matcher(outputs, targets)
    parts = [p[0, 0].T for p in matcher.cost(outputs, targets, parts=True)]  # (T, Q) each: objects x queries
    picture, scale = for_display(pixels)
    H, W = pixels.shape[-2:]
    size = torch.tensor([W, H, W, H]) * scale

    gt_boxes = box_convert(target["boxes"], "cxcywh", "xyxy") * size  # the picture's pixels
    query_boxes = box_convert(outputs["pred_boxes"][0, queries], "cxcywh", "xyxy") * size
    colours = [class_colour(l) for l in target["labels"][objects].tolist()]
    probs = outputs["pred_logits"][0, queries].softmax(-1)[torch.arange(len(queries)), target["labels"][objects]]
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


def pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: --log and --weights need matplotlib: pip install matplotlib") from None
    return plt


def plot_log(log_path, out_path):
    """Training curves of a log.jsonl: the losses (with the additions' own terms where present),
    learning rate, val mAP, and the diagnostics of train.training_diagnostics: gradient and weight
    norms per part, and how alike the queries are (DETR's early plateau is where they all agree)."""
    plt = pyplot()
    if not os.path.isfile(log_path):
        raise SystemExit(f"error: no log file {log_path}")
    with open(log_path) as f:
        records = [loads(line) for line in f if line.strip()]
    model_parts = list(dict.fromkeys(k.removeprefix("grad_norm_") for r in records for k in r if k.startswith("grad_norm_")))
    panels = [("loss", ["loss"], False), ("classification", ["loss_ce", "loss_ce_enc", "loss_ce_dn"], False),
              ("L1 box", ["loss_bbox", "loss_bbox_enc", "loss_bbox_dn"], False),
              ("GIoU", ["loss_giou", "loss_giou_enc", "loss_giou_dn"], False), ("learning rate", ["lr"], True),
              ("val", ["val_mAP50", "val_mAP50_07", "val_mAP"], False),
              ("gradient norm (before clipping)", [f"grad_norm_{p}" for p in model_parts], True),
              ("weight norm", [f"weight_norm_{p}" for p in model_parts], True),
              ("queries: distinct classes, box spread x10", ["query_classes", "query_box_spread"], False),
              ("matched IoU by layer (dashed: denoising)",
               sorted(dict.fromkeys(k for r in records for k in r if k.startswith("iou_")), key=iou_order), False)]
    fig, axes = plt.subplots(2, 5, figsize=(25, 9))
    for ax, (title, panel_keys, log_scale) in zip(axes.flat, panels):
        for key in panel_keys:
            scale = 10 if key == "query_box_spread" else 1  # spread in image widths, drawn beside a count
            points = [(r["iter"], r[key] * scale) for r in records if key in r]
            if points:
                label = key.removeprefix("grad_norm_").removeprefix("weight_norm_").removeprefix("iou_")
                ax.plot(*zip(*points), label=label, marker="o" if key.startswith("val") else None,
                        linestyle="--" if key.startswith("iou_dn") else "-")
        ax.set_title(title)
        ax.set_xlabel("iteration")
        if ax.lines:
            ax.legend(fontsize=7)
            if log_scale:
                ax.set_yscale("log")
    return save_figure(fig, out_path, f"{len(records)} log records")


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


def save_figure(fig, out_path, what):
    fig.tight_layout()
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    fig.savefig(out_path, dpi=max(80, math.ceil(MIN_SIDE / min(fig.get_size_inches()))))
    print(f"{what} -> {out_path}")
    return out_path


def main():
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
    if weights:
        plot_weights(model, os.path.join(out_dir, "weights.png"))
        return
    if matching:
        path = split_json(config, split or config.get("val_split", "val"))
        split_images(path, model.classes)  # one error line for no such split, or other classes
        data = DetectionDataset(path, val_transform(val_scale, max_size))
        model.to(device).eval()
        cost_weights = tuple(config.get(k, default) for k, default in (("cost_class", 1.0), ("cost_bbox", 5.0), ("cost_giou", 2.0)))
        os.makedirs(out_dir, exist_ok=True)
        for i in range(min(max_images, len(data))):
            name = os.path.splitext(os.path.basename(data.paths[i]))[0]
            draw_matching(model, data, i, cost_weights, os.path.join(out_dir, f"{name}_matching.png"))
        return
    if json and split:  # a prepared split: the dataset's own image and category ids
        path = split_json(config, split)
        paths, image_ids, category_ids = split_images(path, model.classes)
        detect(model, category_ids or model.category_ids, val_scale, max_size, paths, os.path.dirname(path), json, image_ids,
               batch_size or config.get("batch_size", 8), config.get("pad_to", 1))
        return
    if json:
        if not images:
            raise SystemExit("error: --json needs --images=DIR (or one image file), or --split=NAME of the checkpoint's dataset")
        paths = image_paths(images, None, model.classes)
        root = images if os.path.isdir(images) else os.path.dirname(images)
        detect(model, model.category_ids, val_scale, max_size, paths, root, json, None,
               batch_size or config.get("batch_size", 8), config.get("pad_to", 1))
        return
    sample(model, val_scale, max_size, image_paths(images, split_json(config, config.get("val_split")), model.classes))


if __name__ == "__main__":
    flags = ("ckpt", "images", "out_dir", "device", "threshold", "max_images", "attention", "num_pixels", "log",
             "weights", "json", "top_k", "batch_size", "split", "matching")
    globals().update(configure({k: globals()[k] for k in flags}, sys.argv[1:]))
    if not 0 <= threshold <= 1 or max_images < 1 or num_pixels < 1 or top_k < 0 or batch_size < 0:
        sys.exit("error: --threshold must be in [0, 1], --max_images and --num_pixels >= 1, --top_k and --batch_size >= 0")
    if json and not os.path.isdir(os.path.dirname(os.path.abspath(json))):
        sys.exit(f"error: no folder for --json={json}")
    if split and (images or not (json or matching)):
        sys.exit("error: --split=NAME takes the images of that split for --json or --matching, instead of --images")
    if device_problem(device):
        sys.exit(f"error: {device_problem(device)}")
    try:
        if not json:  # every picture goes there
            os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        sys.exit(f"error: cannot write to --out_dir={out_dir} ({e.strerror})")
    if matching and (images or json or attention):
        sys.exit("error: --matching needs the ground truth of a prepared split (--split=NAME, else the checkpoint's val split): not --images, --json or --attention")
    main()
