"""
The one dataset format that train.py reads and every data/<name>/prepare.py writes:
data/<name>/<split>.json holds

    {"classes": ["aeroplane", "bicycle", ...],          # K distinct names; label i is classes[i]
     "category_ids": [1, 2, ...],                        # optional: the source dataset's id of each class (COCO's)
     "images": [{"file": "images/val/0001.jpg",          # relative to the json's folder, or absolute
                 "width": 500, "height": 375,            # of the image as displayed (EXIF orientation applied)
                 "boxes": [[x0, y0, x1, y1], ...],       # absolute pixels, x1 > x0 and y1 > y0
                 "labels": [0, 14, ...],                 # one class index 0..K-1 per box
                 "difficult": [0, 1, ...],               # optional (VOC): kept out of training, ignored in evaluation
                 "iscrowd": [0, 0, ...],                 # optional (COCO): a crowd region, evaluated as COCOeval does
                 "area": [1520.5, ...],                  # optional (COCO): its area, for mAP_small/medium/large
                 "id": 397133},                          # optional: the source dataset's image id
                ...]}

Images may hold no objects (empty lists). VOC's 1-based pixel indices become x0 = xmin - 1,
y0 = ymin - 1, x1 = xmax, y1 = ymax (data/voc/prepare.py).

Sizes and boxes are those of the image as a person sees it: a phone stores a portrait photo as
landscape pixels with an EXIF orientation tag, and browsers and labelling tools show it upright, so
their boxes are upright too. displayed_size reads that size from a file's header, and
data/pipeline.read_image turns the pixels the same way (PIL's ImageOps.exif_transpose).
"""

import json
import math

from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")  # what a folder of images may hold
EXIF_ORIENTATION = 0x0112  # the EXIF tag; its values 5 to 8 turn the image a quarter, so width and height swap


# The same class under VOC's and COCO's names (the six that differ), so that the official COCO model keeps
# its rows for all 20 VOC classes when fine-tuned (weights.transfer_weights) and is scored on VOC by name
CLASS_ALIASES = {"aeroplane": "airplane", "diningtable": "dining table", "motorbike": "motorcycle",
                 "pottedplant": "potted plant", "sofa": "couch", "tvmonitor": "tv"}


def class_key(name):
    """A class name as models and datasets are matched by: case aside, VOC's six names as COCO's."""
    return CLASS_ALIASES.get(name.lower(), name.lower())


def displayed_size(path):
    """(width, height) of an image file as displayed, from its header alone (no decoding); an unreadable
    file raises OSError (or SyntaxError, as PIL does for some)."""
    with Image.open(path) as im:
        width, height = im.size
        return (height, width) if turned(im) else (width, height)


def turned(im):
    """Whether an opened image's EXIF orientation turns it a quarter to display it (width and height swap)."""
    return im.getexif().get(EXIF_ORIENTATION) in (5, 6, 7, 8)


def raw_frame_warning(path, width, height):
    """A warning line when an annotation's size (width, height) is the raw, unturned frame of a photo that
    EXIF turns a quarter to display, else None: its boxes were likely drawn by a tool that ignores EXIF
    (labelImg), on pixels other than those every script here reads."""
    with Image.open(path) as im:
        if not turned(im) or (width, height) != im.size or width == height:
            return None
        return (f"warning: {path}: its annotation gives {width}x{height}, the photo's raw frame, but EXIF displays it "
                f"{height}x{width}: a tool that ignores EXIF (labelImg) may have drawn its boxes on the raw frame; "
                f"check them (python tools/analyses.py --matching)")


def read_json(path, advice=""):
    """A json file's content, or one error line: the file cannot be read, or is not json."""
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        raise SystemExit(f"error: cannot read {path} ({e.strerror or type(e).__name__})")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SystemExit(f"error: {path} is not valid json ({e}){advice}")


def read_dataset_json(path):
    """A prepared dataset json (the format above), checked throughout: its first problem is one error
    line that names the file, the image and what is wrong."""
    data = read_json(path, "; prepare it again")

    def fail(what):
        raise SystemExit(f"error: {path}: {what}")

    def numbers(v, n=None):
        return isinstance(v, list) and (n is None or len(v) == n) and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)

    if (not isinstance(data, dict) or not isinstance(data.get("classes"), list)
            or not isinstance(data.get("images"), list)):
        fail("not a prepared dataset (needs 'classes' and 'images' lists; see data/*/prepare.py)")
    classes = data["classes"]
    if not classes or not all(isinstance(c, str) for c in classes) or len(set(classes)) != len(classes):
        fail("'classes' should be a non-empty list of distinct names")
    if "category_ids" in data and not (numbers(data["category_ids"], len(classes))
                                       and all(isinstance(i, int) for i in data["category_ids"])):
        fail(f"'category_ids' should be {len(classes)} integers, one per class")
    if not data["images"]:
        fail("has no images")
    for i, r in enumerate(data["images"]):
        if not isinstance(r, dict) or not isinstance(r.get("file"), str):
            fail(f"image {i} has no 'file'")
        where = f"image {i} ({r['file']})"
        W, H = r.get("width"), r.get("height")
        if not (isinstance(W, int) and isinstance(H, int) and W > 0 and H > 0):
            fail(f"{where}: width and height should be integers > 0")
        boxes, labels = r.get("boxes"), r.get("labels")
        if not isinstance(boxes, list) or not all(numbers(b, 4) for b in boxes):
            fail(f"{where}: 'boxes' should be a list of [x0, y0, x1, y1]")
        if not isinstance(labels, list) or len(labels) != len(boxes):
            fail(f"{where}: 'labels' should be one per box")
        for key in ("difficult", "iscrowd", "area"):
            if key in r and not (numbers(r[key]) and len(r[key]) == len(boxes)):
                fail(f"{where}: '{key}' should be one number per box")
        for label in labels:
            if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(classes):
                fail(f"{where}: label {label!r} is not a class index 0..{len(classes) - 1}")
        slack = 0.1 * max(W, H)  # boxes a little outside the image are clipped by the transforms; far outside is a bug
        for x0, y0, x1, y1 in boxes:
            if x1 <= x0 or y1 <= y0:
                fail(f"{where}: box {[x0, y0, x1, y1]} is empty (needs x1 > x0 and y1 > y0)")
            if x0 < -slack or y0 < -slack or x1 > W + slack or y1 > H + slack:
                fail(f"{where}: box {[x0, y0, x1, y1]} lies outside the {W}x{H} image")
    return data
