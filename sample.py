"""
Detect objects with a DETR: draw them and what they attend to (paper Figs. 6 and 3), or write them as COCO results
records (--json). The Python API is detect; the paper's other analyses are in tools/analyses.py.

    python sample.py --ckpt=out-shapes/ckpt.pt --attention             # val images -> samples/<name>(_attention).png
    python sample.py --ckpt=detr-r50 --images=photos/ --json=d.json    # the official COCO model; detections as data
"""

import os
import sys
import time
from json import dump  # the name json is the --json flag's

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from configurator import configure, device_problem
from data.format import IMAGE_EXTENSIONS, read_dataset_json
from data.pipeline import dataset_dir, read_image
from lib import metrics
from lib.draw import class_colour, draw_boxes, for_display, text_font
from lib.inference import ImageFiles, autocast, class_map, predict, run_dtype
from lib.weights import LoadError, load_model

# defaults, each overridable as --key=value
ckpt = "out-shapes/ckpt.pt"  # minidetr's, an official one (a .pth file, 'detr-r50' ...), a transformers folder / hub id
images = ""  # an image file or a folder of them; empty: the checkpoint's val split
split = ""  # --json, instead of --images: a split of a prepared dataset (val ...), with its own image and category ids
dataset = ""  # with --split: a prepared dataset (a name under data/ or a folder); empty: the checkpoint's own
out_dir = "samples"  # where the pictures go
device = "cpu"  # cpu, or cuda
threshold = 0.7  # draw detections whose class probability is above this (with --json: only when given)
max_images = 8  # images drawn
json = ""  # --json=PATH: write the detections of every image of --images to PATH instead of drawing
top_k = 0  # with --json: keep the top_k detections per image instead of every one
batch_size = 0  # images per forward pass; 0: the checkpoint's own (official models': 2), padded so (lib/inference.py)
attention = False  # also draw the attention maps of every kept detection
num_pixels = 4  # encoder self-attention is shown from this many pixels (the centres of detections)


def load(ckpt):
    """weights.load_model's (model, config), or one error line; outputs named by number where the file names none."""
    try:
        model, config = load_model(ckpt)
    except LoadError as e:
        raise SystemExit(f"error: {e}")
    model.classes = model.classes or [f"class {i}" for i in range(model.num_classes)]
    return model, config


def split_json(config, split, dataset=""):
    """A prepared split's json, of dataset else a minidetr checkpoint's own (its config); None where neither."""
    name = dataset or config.get("dataset")
    return os.path.join(dataset_dir(name), f"{split}.json") if name else None


def split_images(split_path, classes=None, hint="give --images=path, or "):
    """A split's image paths, own image ids (else the index), classes and category ids, or one error line."""
    if split_path is None or not os.path.isfile(split_path):
        raise SystemExit(f"error: {hint}--split=NAME of a prepared split (--dataset, else the checkpoint's own; "
                         f"no split {split_path or 'of a minidetr checkpoint'})")
    data = read_dataset_json(split_path)
    if classes is not None and data["classes"] != classes:
        raise SystemExit(f"error: {split_path} has classes {data['classes']}, the checkpoint {classes}")
    root, records = os.path.dirname(os.path.abspath(split_path)), data["images"]
    return ([os.path.join(root, r["file"]) for r in records], [r.get("id", i) for i, r in enumerate(records)],
            data["classes"], data.get("category_ids"))


def image_paths(images, val_json, classes):
    """The images to sample: a file, a folder's images, or the first ones of the val split."""
    if not images:
        return split_images(val_json, classes)[0]
    if os.path.isfile(images):
        return [images]
    if not os.path.isdir(images):
        raise SystemExit(f"error: no image or folder at {images}")
    paths = sorted(os.path.join(images, f) for f in os.listdir(images) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not paths:
        raise SystemExit(f"error: no images ({', '.join(IMAGE_EXTENSIONS)}) in {images}")
    return paths


def detect(model, images, threshold=0.5, device="cpu", top_k=0, num_workers=0):
    """The Python API: a model's detections on images (paths, or PIL images as displayed), run as its run evaluated
    them. Per image: boxes (N, 4) xyxy in its pixels, scores above threshold (or the top_k best), labels and names,
    surest first; None for an image that cannot be read (logged)."""
    data = ImageFiles(images, model.to(device))
    predictions = predict(model, data, device, dtype=run_dtype(model, device), num_workers=num_workers)
    classes = model.classes or [f"class {k}" for k in range(model.num_classes)]
    found = [None] * len(data)  # None: unreadable
    for i, p in predictions.items():
        order = p["scores"].argsort(descending=True)
        keep = order[:top_k] if top_k else order[p["scores"][order] > threshold]
        found[i] = {**{k: p[k][keep] for k in ("boxes", "scores", "labels")},
                    "names": [classes[label] for label in p["labels"][keep].tolist()]}
    return found


def write_json(model, paths, root, out_path, image_ids=None, category_ids=None, threshold=None, top_k=0, device="cpu",
               max_dets=100):
    """--json: a COCO results record per detection, and its file_name, to out_path (image_ids: each path's, else the
    index; category_ids: each output's, -1 leaves it out). threshold None, no top_k: all that COCO's AP counts."""
    start = time.perf_counter()
    found = detect(model, paths, -1.0 if threshold is None else threshold, device, top_k,  # -1: every score passes
                   num_workers=min(4, os.cpu_count() or 1))
    read = [(i, d) for i, d in enumerate(found) if d is not None]  # the others unreadable (logged)
    if not read:
        raise SystemExit(f"error: none of the {len(paths)} images could be read")
    records = []
    for i, d in read:
        if threshold is None and not top_k:  # each class's max_dets surest (detect sorts them surest first)
            keep = metrics.top_of_each_class(d["labels"], max_dets)
            d = {k: d[k][keep] for k in ("boxes", "scores", "labels")}
        for record in metrics.coco_results([d], [i if image_ids is None else image_ids[i]], category_ids):
            if record["category_id"] != -1:
                records.append({"file_name": os.path.relpath(paths[i], root), **record})
    with open(out_path, "w") as f:
        dump(records, f)
    speed = len(read) / (time.perf_counter() - start)
    print(f"{len(records)} detections of {len(read)} images ({speed:.1f} images/s) -> {out_path}")
    return records


def draw_detections(image, result, classes, threshold):
    """image (3, H, W) uint8, result a postprocess dict -> (the picture drawn (for_display's), kept query ids)."""
    picture, scale = for_display(image)
    keep = torch.nonzero(result["scores"] > threshold).flatten()
    keep = keep[result["scores"][keep].argsort(descending=True)]  # surest first
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
    heat = F.interpolate(heat[None, None].float(), size=image.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    heat = (heat - heat.min()) / (heat.max() - heat.min() + 1e-12)
    colour = torch.stack([(3 * heat - k).clamp(0, 1) for k in range(3)]) * 255  # "hot": black, red, yellow, white
    return Image.fromarray((0.35 * image.float() + 0.65 * colour).to(torch.uint8).permute(1, 2, 0).numpy())


def grid(panels, titles, columns=4):
    """Paste PIL panels (all of one size) with a title line above each into one PIL image."""
    (W, H), font = panels[0].size, text_font(panels[0])
    band = font.size + 10  # the title line's height
    rows, columns = (len(panels) + columns - 1) // columns, min(columns, len(panels))
    sheet = Image.new("RGB", (columns * W, rows * (H + band)), "white")
    for i, (panel, title) in enumerate(zip(panels, titles)):
        x, y = (i % columns) * W, (i // columns) * (H + band)
        sheet.paste(panel, (x, y + band))
        ImageDraw.Draw(sheet).text((x + 4, y + 4), title, fill="black", font=font)
    return sheet


def sample(model, paths, out_dir, threshold=0.7, device="cpu", attention=False, num_pixels=4):
    """Draw each image's detections above threshold into out_dir (with attention, also draw_attention's grid)."""
    os.makedirs(out_dir, exist_ok=True)
    predictions = predict(model, ImageFiles(paths, model.to(device)), device, dtype=run_dtype(model, device))
    written = []
    for i in sorted(predictions):
        pixels, result = read_image(paths[i]), predictions[i]
        drawn, keep = draw_detections(pixels, result, model.classes, threshold)
        name = os.path.splitext(os.path.basename(paths[i]))[0]
        written.append(os.path.join(out_dir, f"{name}.png"))
        drawn.save(written[-1])
        print(f"{paths[i]}: {len(keep)} detections above {threshold} -> {written[-1]}")
        if attention:  # the attention of the queries kept, from a forward of the image alone (its own grid)
            with torch.no_grad(), autocast(device, run_dtype(model, device)):
                outputs = model.eval()(ImageFiles(paths[i : i + 1], model)[0][0][None].to(device), need_weights=True)
            written.append(draw_attention(pixels, outputs, result, drawn, keep, model.classes,
                                          os.path.join(out_dir, f"{name}_attention.png"), num_pixels))
    if not written:
        raise SystemExit(f"error: none of the {len(paths)} images could be read")
    return written


def draw_attention(pixels, outputs, result, drawn, keep, classes, path, num_pixels=4):
    """A grid: the detections, then each one's last decoder cross-attention (paper Fig. 6), then the last encoder
    self-attention from the detections' centres, or from a few spread pixels if none (Fig. 3)."""
    (H, W), (h, w) = pixels.shape[-2:], outputs["feat_size"]
    decoder, encoder = (attention_maps(outputs[k][-1][0].cpu(), (h, w)) for k in ("dec_attn", "enc_attn"))  # Q, hw
    picture, scale = for_display(pixels)
    panels, titles = [drawn], ["detections"]
    keep = keep[:8]  # the 8 surest, to keep the grid readable
    for q, label in zip(keep.tolist(), result["labels"][keep].tolist()):
        text = f"{classes[label]} {result['scores'][q]:.2f}"
        panels.append(draw_boxes(heat_overlay(picture, decoder[q]), result["boxes"][q : q + 1] * scale, [text],
                                 [class_colour(label)]))
        titles.append(f"query {q}: {text}")
    centres = ([((b[1] + b[3]) / 2, (b[0] + b[2]) / 2) for b in result["boxes"][keep].tolist()] if len(keep) else
               [(H * (i + 1) / (num_pixels + 1), W * (i + 1) / (num_pixels + 1)) for i in range(num_pixels)])
    for cy, cx in centres[:num_pixels]:
        r, c = min(int(cy / H * h), h - 1), min(int(cx / W * w), w - 1)
        panels.append(heat_overlay(picture, encoder[r * w + c]))
        x, y, radius = cx * scale, cy * scale, max(3, min(panels[-1].size) // 100)
        ImageDraw.Draw(panels[-1]).ellipse((x - radius, y - radius, x + radius, y + radius), "cyan", "black")
        titles.append(f"encoder, from pixel ({int(cx)}, {int(cy)})")
    grid(panels, titles).save(path)
    return path


def main(given=()):  # given: the flags the command line set (--json writes every detection unless --threshold is)
    model, config = load(ckpt)
    json_threshold, max_dets = threshold if "threshold" in given else None, config.get("max_dets", 100)
    model.eval_config["batch_size"] = batch_size or model.eval_config["batch_size"]
    if not json:
        paths = image_paths(images, split_json(config, config.get("val_split")), model.classes)
        return sample(model, paths[:max_images], out_dir, threshold, device, attention, num_pixels)
    if split:  # a prepared split: the dataset's own image and category ids, its classes matched by name
        path = split_json(config, split, dataset)
        paths, image_ids, classes, category_ids = split_images(path)
        ids = class_map(model, classes).tolist()  # each output's dataset class, -1 for none
        ids, root = [c if c < 0 or category_ids is None else category_ids[c] for c in ids], os.path.dirname(path)
    else:
        paths, image_ids, ids = image_paths(images, None, model.classes), None, model.category_ids
        root = images if os.path.isdir(images) else os.path.dirname(images)
    write_json(model, paths, root, json, image_ids, ids, json_threshold, top_k, device, max_dets)


if __name__ == "__main__":
    flags = ("ckpt", "images", "out_dir", "device", "threshold", "max_images", "attention", "num_pixels", "json",
             "top_k", "batch_size", "split", "dataset")
    given = set()
    globals().update(configure({k: globals()[k] for k in flags}, sys.argv[1:], given=given))
    if not 0 <= threshold <= 1 or max_images < 1 or num_pixels < 1 or min(top_k, batch_size) < 0:
        sys.exit("error: --threshold must be in [0, 1], --max_images, --num_pixels >= 1, --top_k, --batch_size >= 0")
    if json and not os.path.isdir(os.path.dirname(os.path.abspath(json))):
        sys.exit(f"error: no folder for --json={json}")
    if json and not (images or split):
        sys.exit("error: --json needs --images=DIR (or one image file), or --split=NAME of the checkpoint's dataset")
    if split and (images or not json):
        sys.exit("error: --split=NAME takes the images of that split for --json, instead of --images")
    if device_problem(device):
        sys.exit(f"error: {device_problem(device)}")
    try:
        if not json:  # every picture goes there
            os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        sys.exit(f"error: cannot write to --out_dir={out_dir} ({e.strerror})")
    main(given)
