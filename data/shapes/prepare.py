r"""
Draw the synthetic "shapes" detection set: coloured circles, squares, triangles and stars on noisy,
textured backgrounds, some overlapping, some cut by the border. It is minidetr's embedded default:
no download, and a small DETR learns it on a CPU in minutes.

    python data/shapes/prepare.py                         # 2000 train + 200 val images, 128x128
    python data/shapes/prepare.py --image_size=256 --num_train=10000
    python data/shapes/prepare.py --out_dir=data/shapes_crowded --num_train=0 --min_objects=7 \
        --max_objects=10 --seed=4242      # more objects an image than training showed (tools/eval.py, paper §4.2)

Writes data/shapes/{train,val}.json (the format of data/format.py) and data/shapes/images/{train,val}/*.jpg.
Ground-truth boxes are exact: computed from the drawn geometry (shapes are drawn at 4x resolution
and downsampled, so edges are anti-aliased and sub-pixel exact), then clipped to the image.
The same seed always gives the same json, whatever the number of worker processes.
"""

import json
import math
import os
import sys
from multiprocessing import Pool

import numpy as np
from PIL import Image, ImageDraw

# defaults, each overridable as --key=value
out_dir = os.path.dirname(os.path.abspath(__file__))  # where the jsons and images go
num_train = 2000  # training images
num_val = 200  # validation images
image_size = 128  # images are square, image_size x image_size pixels
min_objects, max_objects = 1, 6  # objects per image, uniform (more: the paper's §4.2, tools/eval.py's by_object_count)
min_size, max_size = 0.15, 0.45  # object size (box side before rotation) as a fraction of the image
seed = 1337  # the same seed draws the same images
workers = os.cpu_count()  # drawing processes

CLASSES = ["circle", "square", "triangle", "star"]
SUPERSAMPLE = 4


def polygon(kind, cx, cy, size, angle):
    """Vertices (K, 2) of a shape of the given size (its circumscribed diameter) turned by angle."""
    if kind == "square":
        radii, n = [size / 2 * math.sqrt(2)] * 4, 4
        angle += math.pi / 4
    elif kind == "triangle":
        radii, n = [size / 2] * 3, 3
    else:  # star: 5 outer points, 5 inner
        radii, n = [size / 2, size / 5] * 5, 10
    a = angle + np.arange(n) * 2 * math.pi / n
    return np.stack([cx + np.array(radii) * np.cos(a), cy + np.array(radii) * np.sin(a)], axis=1)


def background(rng, s):
    """A random colour, a smooth gradient and pixel noise: no two backgrounds look alike."""
    base = rng.uniform(40, 215, size=3)
    yy, xx = np.mgrid[0:s, 0:s] / s
    gradient = (rng.uniform(-60, 60, size=3) * xx[..., None] + rng.uniform(-60, 60, size=3) * yy[..., None])
    stripes = rng.uniform(0, 25) * np.sin(2 * math.pi * rng.uniform(2, 8) * (xx * rng.uniform(-1, 1) + yy))[..., None]
    noise = rng.normal(0, rng.uniform(5, 25), size=(s, s, 3))
    return np.clip(base + gradient + stripes + noise, 0, 255).astype(np.uint8)


def overlap(a, b):
    """The larger of the two fractions of each box covered by the other."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return max(inter / ((a[2] - a[0]) * (a[3] - a[1])), inter / ((b[2] - b[0]) * (b[3] - b[1])))


def draw_image(args):
    """One image from its own seed: returns its record (boxes in pixels, clipped to the image)."""
    split, index, path = args
    rng = np.random.default_rng([seed, 0 if split == "train" else 1, index])
    s = image_size
    pixels = background(rng, s)
    big = Image.fromarray(pixels).resize((s * SUPERSAMPLE, s * SUPERSAMPLE), Image.NEAREST)
    draw = ImageDraw.Draw(big)
    boxes, labels = [], []
    num_objects = rng.integers(min_objects, max_objects + 1)
    for _ in range(100):  # tries; most images fill up in a few
        if len(boxes) == num_objects:
            break
        label = int(rng.integers(len(CLASSES)))
        size = rng.uniform(min_size, max_size) * s
        cx, cy = rng.uniform(0.02, 0.98, size=2) * s  # centres inside: at most about half a shape is cut off
        if CLASSES[label] == "circle":
            r = size / 2
            vertices = np.array([[cx - r, cy - r], [cx + r, cy + r]])
        else:
            vertices = polygon(CLASSES[label], cx, cy, size, rng.uniform(0, 2 * math.pi))
        x0, y0 = np.clip(vertices.min(0), 0, s)
        x1, y1 = np.clip(vertices.max(0), 0, s)
        box = [float(x0), float(y0), float(x1), float(y1)]
        if x1 - x0 < 0.05 * s or y1 - y0 < 0.05 * s:  # mostly outside: not a fair object
            continue
        if any(overlap(box, other) > 0.4 for other in boxes):  # overlap a little, never hide
            continue
        colour = rng.integers(0, 256, size=3)
        local = pixels[int(y0) : int(math.ceil(y1)), int(x0) : int(math.ceil(x1))].reshape(-1, 3).mean(0)
        if np.abs(colour - local).sum() < 150:  # keep every shape visible on its background
            continue
        big_vertices = [tuple(v) for v in vertices * SUPERSAMPLE]
        if CLASSES[label] == "circle":
            draw.ellipse(big_vertices, fill=tuple(int(c) for c in colour))
        else:
            draw.polygon(big_vertices, fill=tuple(int(c) for c in colour))
        boxes.append(box)
        labels.append(label)
    big.resize((s, s), Image.BOX).save(path, quality=95)
    return {"file": os.path.relpath(path, out_dir), "width": s, "height": s,
            "boxes": [[round(v, 3) for v in b] for b in boxes], "labels": labels, "difficult": [0] * len(labels)}


def main():
    for split, count in (("train", num_train), ("val", num_val)):
        os.makedirs(os.path.join(out_dir, "images", split), exist_ok=True)
        jobs = [(split, i, os.path.join(out_dir, "images", split, f"{i:06d}.jpg")) for i in range(count)]
        with Pool(workers) as pool:
            records = pool.map(draw_image, jobs, chunksize=32)
        with open(os.path.join(out_dir, f"{split}.json"), "w") as f:
            json.dump({"classes": CLASSES, "images": records}, f)
        num_objects = sum(len(r["labels"]) for r in records)
        print(f"{split}: {count} images, {num_objects} objects -> {os.path.join(out_dir, split + '.json')}")


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # the repository root
    from configurator import configure  # the repository's one flag parser

    flags = ("out_dir", "num_train", "num_val", "image_size", "seed", "workers", "min_objects", "max_objects")
    globals().update(configure({k: globals()[k] for k in flags}, sys.argv[1:]))
    if num_train < 0 or num_val < 0 or image_size < 32 or workers < 1 or not 1 <= min_objects <= max_objects:
        sys.exit("error: --num_train and --num_val must be >= 0, --image_size >= 32, --workers >= 1, "
                 "1 <= --min_objects <= --max_objects")
    main()
