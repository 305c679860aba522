"""
Read a YOLO dataset (ultralytics' and Roboflow's layout) into minidetr's dataset format (data/format.py).

    python data/yolo/prepare.py --yaml=data.yaml --out_dir=data/mine       # every split the yaml names
    python data/yolo/prepare.py --images=DIR --labels=DIR --names=cat,dog --split=train --out_dir=data/mine

data.yaml names the classes (`names`: a list, or a dict {0: cat, 1: dog}) and the splits (`train`,
`val`, `test`), each a folder of images, a txt file listing images, or a list of those, relative to
`path` (the dataset's root; relative to the yaml's own folder, which is also the default). As
ultralytics does, an image's labels are found by replacing the last /images/ of its path by
/labels/ and its extension by .txt: one object per line, `class cx cy w h` normalised to [0, 1],
or a YOLO-seg polygon `class x1 y1 x2 y2 ...`, which becomes the polygon's bounding box. Boxes
become pixels of the image as displayed (EXIF orientation applied: data/format.py).

An image with no label file, or an empty one, is kept with no objects. As ultralytics checks labels: a
malformed line, an unknown class (0.0 is class 0), a coordinate outside [0, 1] (a label in pixels; 0.01
of slack, then clipped) or a box with no area is one logged skip, and duplicate lines are removed; so
is an image that cannot be read, or a label file with no image skipped. The summary counts them. A yaml
without names or splits, or a split with no image, is one error line. Needs PyYAML for --yaml (pip
install pyyaml; ultralytics installs it).
"""

import glob
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # the repository root
from configurator import configure  # noqa: E402  (the repository's one flag parser)
from data.format import IMAGE_EXTENSIONS, displayed_size  # noqa: E402

# defaults, each overridable as --key=value
yaml = ""  # an ultralytics / Roboflow data.yaml
images = ""  # instead of --yaml: a folder of images ...
labels = ""  # ... a folder of their label files (empty: the images -> labels rule) ...
names = ""  # ... the class names in label order, comma-separated ...
split = "train"  # ... and the split they make: writes <out_dir>/<split>.json
out_dir = os.path.dirname(os.path.abspath(__file__))  # where <split>.json goes (by default this folder)

def read_yaml(path):
    """(class names, {split: [image paths]}) of a data.yaml, or one error line."""
    try:
        import yaml as pyyaml
    except ImportError:
        raise SystemExit("error: reading a data.yaml needs PyYAML: pip install pyyaml") from None
    try:
        with open(path, "rb") as f:
            data = pyyaml.safe_load(f)
    except OSError as e:
        raise SystemExit(f"error: cannot read {path} ({e.strerror or type(e).__name__})") from None
    except (pyyaml.YAMLError, UnicodeDecodeError) as e:
        raise SystemExit(f"error: {path} is not valid yaml ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise SystemExit(f"error: {path} holds no settings (expected names: and train: / val:)")
    classes = class_names(data.get("names"), path)
    root = os.path.join(os.path.dirname(os.path.abspath(path)), str(data.get("path") or ""))
    splits = {s: data[s] for s in ("train", "val", "test") if data.get(s)}
    if not splits:
        raise SystemExit(f"error: {path} names no split (train:, val: or test:)")
    if "test" in splits and len(splits) > 1 and not os.path.exists(os.path.join(root, str(splits["test"]))):
        print(f"skip split test: no {splits.pop('test')!r} under {root}")  # ultralytics' test is optional too
    return classes, {s: image_files(entry, root, f"{path}'s {s}") for s, entry in splits.items()}


def class_names(names, source):
    """names: a list, or a dict {0: 'cat', 1: 'dog'} numbered 0, 1, 2 ...; else one error line."""
    if isinstance(names, dict):
        try:
            names = {int(k): v for k, v in names.items()}
        except (TypeError, ValueError):
            names = None
        if names is not None and sorted(names) == list(range(len(names))):
            names = [names[i] for i in range(len(names))]
    if not isinstance(names, list) or not names or len({str(n) for n in names}) != len(names):
        raise SystemExit(f"error: {source} needs names: a list of distinct class names, or a dict 0: name, 1: name ...")
    return [str(n) for n in names]


def image_files(entry, root, source):
    """The images of a split entry: a folder (searched recursively), a txt list (its lines relative to the
    txt's folder) or a list of those, each relative to root; ultralytics' '../' quirk (Roboflow's exports
    write ../train/images beside the yaml) is tried too."""
    paths = []
    for item in entry if isinstance(entry, list) else [entry]:
        path = os.path.join(root, str(item))
        if not os.path.exists(path) and str(item).startswith("../"):
            path = os.path.join(root, str(item)[3:])
        if os.path.isdir(path):
            paths += sorted(p for p in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                            if p.lower().endswith(IMAGE_EXTENSIONS))
        elif os.path.isfile(path) and path.endswith(".txt"):
            with open(path) as f:
                lines = [line.strip() for line in f if line.strip()]
            paths += [os.path.normpath(os.path.join(os.path.dirname(path), line)) for line in lines]
        else:
            raise SystemExit(f"error: {source} is {item!r}: no such folder or txt list under {root}")
    return [os.path.abspath(p) for p in paths]


def label_file(image_path, labels_dir=""):
    """ultralytics' rule: the last /images/ of the path becomes /labels/, the extension .txt (or the file
    of the same name in labels_dir)."""
    if labels_dir:
        return os.path.join(labels_dir, os.path.splitext(os.path.basename(image_path))[0] + ".txt")
    images_dir, labels = os.sep + "images" + os.sep, os.sep + "labels" + os.sep
    return os.path.splitext(labels.join(image_path.rsplit(images_dir, 1)))[0] + ".txt"


COORDINATE_TOLERANCE = 0.01  # a normalised coordinate may stray this far outside [0, 1] (rounding); the box is clipped


def read_labels(path, width, height, num_classes, log):
    """(boxes as [x0, y0, x1, y1] pixels, labels, skipped, duplicates) of one label file, checked as
    ultralytics checks them; a missing file is no objects."""
    boxes, labels, skipped, duplicates, seen = [], [], 0, 0, set()
    if not os.path.isfile(path):
        return boxes, labels, skipped, duplicates
    try:
        with open(path) as f:
            lines = [line.split() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        log(f"skip labels: cannot read {path} ({type(e).__name__})")
        return boxes, labels, 1, 0
    for n, fields in enumerate(lines, 1):
        try:
            label, values = float(fields[0]), [float(v) for v in fields[1:]]
            if not label.is_integer():  # 0.0, as some exporters write it, is class 0
                raise ValueError
            label = int(label)
        except (ValueError, IndexError):
            log(f"skip object: {path} line {n} is not 'class cx cy w h' ({' '.join(fields)[:60]})")
            skipped += 1
            continue
        if (label, *values) in seen:  # ultralytics removes duplicate lines too
            duplicates += 1
            continue
        seen.add((label, *values))
        if not 0 <= label < num_classes:
            log(f"skip object: {path} line {n} has class {fields[0]}, not one of 0..{num_classes - 1}")
            skipped += 1
            continue
        if len(values) == 4:  # a box: centre and size
            cx, cy, w, h = values
            x0, y0, x1, y1 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
        elif len(values) >= 6 and len(values) % 2 == 0:  # a polygon (YOLO-seg): its bounding box
            x0, x1, y0, y1 = min(values[0::2]), max(values[0::2]), min(values[1::2]), max(values[1::2])
        else:
            log(f"skip object: {path} line {n} has {len(values)} numbers (4 for a box, 6 or more for a polygon)")
            skipped += 1
            continue
        if not all(-COORDINATE_TOLERANCE <= v <= 1 + COORDINATE_TOLERANCE for v in values):  # NaN fails too
            log(f"skip object: {path} line {n} has coordinates outside [0, 1] ({' '.join(fields[1:])[:60]}): YOLO "
                f"labels are fractions of the image's width and height, not pixels")
            skipped += 1
            continue
        box = [min(max(x0, 0.0), 1.0) * width, min(max(y0, 0.0), 1.0) * height,
               min(max(x1, 0.0), 1.0) * width, min(max(y1, 0.0), 1.0) * height]
        if not (box[2] > box[0] and box[3] > box[1]):  # NaN fails too
            log(f"skip object: {path} line {n} has no area inside the image")
            skipped += 1
            continue
        boxes.append([round(v, 3) for v in box])
        labels.append(label)
    if duplicates:
        log(f"skip object: {path} has {duplicates} duplicate lines, removed")
    return boxes, labels, skipped, duplicates


def prepare(image_paths, classes, out_dir, split, labels_dir="", log=print):
    """Write <out_dir>/<split>.json; returns (images, objects) written."""
    records, skipped_images, skipped_objects, duplicates, orphans = [], 0, 0, 0, 0
    for path in image_paths:
        try:
            width, height = displayed_size(path)
        except (OSError, SyntaxError) as e:
            log(f"skip image: cannot read {path} ({type(e).__name__})")
            skipped_images += 1
            continue
        boxes, labels, skipped, repeated = read_labels(label_file(path, labels_dir), width, height, len(classes), log)
        skipped_objects, duplicates = skipped_objects + skipped, duplicates + repeated
        records.append({"file": path, "width": width, "height": height, "boxes": boxes, "labels": labels})
    # a label file in this split's label folders with no image of its name in its image folders (other
    # splits may share the folders): each folder listed once
    label_dirs = {os.path.dirname(label_file(p, labels_dir)) for p in image_paths}
    # a txt list may name missing ones
    image_dirs = {os.path.dirname(p) for p in image_paths if os.path.isdir(os.path.dirname(p))}
    image_names = {os.path.splitext(f)[0] for d in image_dirs for f in os.listdir(d)}
    for orphan in sorted(f for d in label_dirs for f in glob.glob(os.path.join(glob.escape(d), "*.txt"))):
        if (os.path.splitext(os.path.basename(orphan))[0] not in image_names
                and os.path.basename(orphan) != "classes.txt"):
            log(f"skip labels: {orphan} has no image")
            orphans += 1
    if not records:
        raise SystemExit(f"error: the {split} split has no image that could be read ({len(image_paths)} listed)")
    os.makedirs(out_dir, exist_ok=True)
    out_path = os.path.join(out_dir, f"{split}.json")
    with open(out_path + ".tmp", "w") as f:
        json.dump({"classes": classes, "images": records}, f)
    os.replace(out_path + ".tmp", out_path)
    objects, empty = sum(len(r["labels"]) for r in records), sum(not r["labels"] for r in records)
    log(f"{split}: {len(records)} images ({empty} without objects), {objects} objects, {len(classes)} classes; "
        f"skipped {skipped_images} images, {skipped_objects} objects, {duplicates} duplicate lines, "
        f"{orphans} label files without an image -> {out_path}")
    return len(records), objects


if __name__ == "__main__":
    globals().update(configure({k: globals()[k] for k in ("yaml", "images", "labels", "names", "split", "out_dir")},
                               sys.argv[1:]))
    if yaml:
        classes, splits = read_yaml(yaml)
        for name, paths in splits.items():
            prepare(paths, classes, out_dir, name)
    elif images and names:
        if not os.path.isdir(images):
            sys.exit(f"error: no image folder {images}")
        prepare(image_files(images, ".", "--images"), class_names(names.split(","), "--names"), out_dir, split, labels)
    else:
        sys.exit("error: give --yaml=data.yaml, or --images=DIR --names=a,b,c (and --labels=DIR, --split=NAME)")
