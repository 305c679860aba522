"""
Turn any COCO detection json (COCO itself, or an export from CVAT, Label Studio, Roboflow, ...) into
minidetr's dataset format (data/format.py).

    python data/coco/prepare.py --ann=annotations/instances_val2017.json --images=val2017 --split=val
    python data/coco/prepare.py --ann=export/train.json --images=export/images --out_dir=data/mine --split=train

--images is the folder that the json's file_name entries are relative to. The output is
<out_dir>/<split>.json (out_dir defaults to this folder):
- category ids (any, not necessarily contiguous) become labels 0..K-1 in the order of their ids;
  "classes" keeps their names and "category_ids" the id of each label, so that detections can be
  written back with the original ids (sample.py --split=NAME --json=PATH);
- boxes [x, y, w, h] become [x0, y0, x1, y1], clipped to the image;
- crowd regions (iscrowd=1) are kept and flagged per object in "iscrowd": train.py leaves them out
  of the training targets and evaluation treats them as COCOeval does; each object's COCO "area"
  is kept for COCO's small / medium / large AP;
- images without annotations are kept: their detections count as false positives;
- each image keeps its COCO id as "id", and the images are sorted by it (COCOeval's order).

Bad input is skipped with one line that names it, and counted in the summary: an image file that
is missing or unreadable or not the size the json says (the image), an annotation with an unknown
image or category id, a malformed bbox, or a box with no area inside its image (the object).
A json that cannot be read at all is one error line.
"""

import json
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # the repository root
from configurator import configure  # noqa: E402  (the repository's one flag parser)
from data.format import displayed_size, raw_frame_warning, read_json  # noqa: E402

# defaults, each overridable as --key=value
ann = ""  # the COCO annotation json
images = ""  # the folder its file_name entries are relative to
out_dir = os.path.dirname(os.path.abspath(__file__))  # where <split>.json goes (by default this folder)
split = "val"  # writes <out_dir>/<split>.json


def read_coco_json(path):
    """The annotation json, with its three lists checked, or one error line."""
    data = read_json(path)
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "categories")):
        raise SystemExit(f"error: {path} is not a COCO detection json (needs 'images' and 'categories' lists)")
    if not isinstance(data.get("annotations", []), list):
        raise SystemExit(f"error: {path}: 'annotations' should be a list")
    for i, c in enumerate(data["categories"]):
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or isinstance(c.get("id"), bool):
            raise SystemExit(f"error: {path}: category {i} has no integer 'id'")
    ids = [c["id"] for c in data["categories"]]
    if len(set(ids)) != len(ids):
        raise SystemExit(f"error: {path}: category id {next(i for i in ids if ids.count(i) > 1)} appears twice")
    if not ids:
        raise SystemExit(f"error: {path} has no categories")
    for i, im in enumerate(data["images"]):
        if (not isinstance(im, dict) or not isinstance(im.get("id"), (int, str))
                or not isinstance(im.get("file_name"), str)):
            raise SystemExit(f"error: {path}: image {i} needs an 'id' and a 'file_name'")
    return data


def prepare(ann, images, out_dir, split, log=print):
    """Write <out_dir>/<split>.json; returns (images, objects, crowds) written."""
    data = read_coco_json(ann)
    if not os.path.isdir(images):
        raise SystemExit(f"error: no image folder {images}")
    categories = sorted(data["categories"], key=lambda c: c["id"])
    label_of = {c["id"]: k for k, c in enumerate(categories)}
    skipped_images = skipped_objects = 0
    records = {}  # COCO image id -> record
    for im in sorted(data["images"], key=lambda im: (str(type(im["id"])), im["id"])):
        path = os.path.abspath(os.path.join(images, im["file_name"]))
        try:
            width, height = displayed_size(path)  # the header only: proof the file is there, and its size as shown
        except (OSError, SyntaxError) as e:
            log(f"skip image {im['id']}: cannot read {path} ({type(e).__name__})")
            skipped_images += 1
            continue
        if (im.get("width", width), im.get("height", height)) != (width, height):
            warning = raw_frame_warning(path, im.get("width"), im.get("height"))
            if warning:  # the likely cause, before the skip
                log(warning)
            log(f"skip image {im['id']}: {path} is {width}x{height}, "
                f"the json says {im.get('width')}x{im.get('height')}")
            skipped_images += 1
            continue
        if im["id"] in records:
            log(f"skip image {im['id']}: the id appears twice ({path})")
            skipped_images += 1
            continue
        records[im["id"]] = {"id": im["id"], "file": path, "width": width, "height": height, "boxes": [],
                             "labels": [], "difficult": [], "iscrowd": [], "area": []}
    known_images = {im["id"] for im in data["images"] if isinstance(im, dict)}
    for a in data.get("annotations", []):
        name = f"annotation {a.get('id', '?')}" if isinstance(a, dict) else "an annotation"
        if not isinstance(a, dict) or a.get("image_id") not in known_images:
            log(f"skip object: {name} has an unknown image_id {a.get('image_id') if isinstance(a, dict) else a!r}")
            skipped_objects += 1
            continue
        record = records.get(a["image_id"])
        if record is None:  # its image was skipped, and counted
            continue
        if a.get("category_id") not in label_of:
            log(f"skip object: {name} has an unknown category_id {a.get('category_id')!r} (image {a['image_id']})")
            skipped_objects += 1
            continue
        bbox = a.get("bbox")
        if (not isinstance(bbox, list) or len(bbox) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)):
            log(f"skip object: {name} has a malformed bbox {bbox!r} (image {a['image_id']})")
            skipped_objects += 1
            continue
        x, y, w, h = bbox
        box = [max(x, 0.0), max(y, 0.0), min(x + w, record["width"]), min(y + h, record["height"])]
        if w <= 0 or h <= 0 or box[2] <= box[0] or box[3] <= box[1]:
            log(f"skip object: {name} has no area inside its {record['width']}x{record['height']} image: "
                f"bbox {bbox} (image {a['image_id']})")
            skipped_objects += 1
            continue
        record["boxes"].append([float(v) for v in box])
        record["labels"].append(label_of[a["category_id"]])
        record["difficult"].append(0)
        record["iscrowd"].append(int(bool(a.get("iscrowd", 0))))
        area = a.get("area")
        record["area"].append(float(area) if isinstance(area, (int, float)) and area >= 0 else float(w * h))
    records = list(records.values())
    if not records:
        raise SystemExit(f"error: none of the {len(data['images'])} images in {ann} could be read from {images}")
    os.makedirs(out_dir, exist_ok=True)
    out_path = os.path.join(out_dir, f"{split}.json")
    classes = [str(c.get("name", c["id"])) for c in categories]
    with open(out_path + ".tmp", "w") as f:
        json.dump({"classes": classes, "category_ids": [c["id"] for c in categories], "images": records}, f)
    os.replace(out_path + ".tmp", out_path)
    objects = sum(len(r["labels"]) for r in records)
    crowds = sum(sum(r["iscrowd"]) for r in records)
    empty = sum(not r["labels"] for r in records)
    log(f"{split}: {len(records)} images ({empty} without objects), {objects} objects ({crowds} crowds), "
        f"{len(classes)} classes; skipped {skipped_images} images, {skipped_objects} objects -> {out_path}")
    return len(records), objects, crowds


if __name__ == "__main__":
    globals().update(configure({k: globals()[k] for k in ("ann", "images", "out_dir", "split")}, sys.argv[1:]))
    if not ann or not images:
        sys.exit("error: give --ann=instances.json and --images=DIR (the folder its file_name entries are in)")
    prepare(ann, images, out_dir, split)
