"""
Read a Pascal VOC devkit into minidetr's dataset format (data/format.py).

    python data/voc/prepare.py --voc_root=/path/to/VOCdevkit             # VOC2007 + VOC2012
    python data/voc/prepare.py --voc_root=~/VOCdevkit --download         # fetch the tarballs first
    python data/voc/prepare.py --voc_root=/path/to/voc-mini/VOCdevkit --years=2012 \\
        --splits=train:train,val:val --out_dir=data/voc-mini     # a 100-photo cut (config/voc_mini.py)

--splits maps each output json to the ImageSets/Main list it is made of, in every year that has
that list: the default `train:trainval,val:test` gives the standard VOC detection protocol
(Faster R-CNN, SSD; the DETR paper reports COCO only): train = VOC2007 trainval + VOC2012
trainval, val = VOC2007 test. VOC pixel indices are 1-based and inclusive:
x0 = xmin - 1, y0 = ymin - 1, x1 = xmax, y1 = ymax. Difficult objects are kept, flagged.

Bad input is skipped with one line that names the file, and counted in the summary: an XML that is
missing or cannot be parsed, a missing or unreadable JPEG (skips the image); a box with
xmax <= xmin or ymax <= ymin, a box outside the image, an unknown class name (skip the object).
"""

import json
import os
import sys
import tarfile
import urllib.request
import xml.etree.ElementTree as ET

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # the repository root
from configurator import configure  # noqa: E402  (the repository's one flag parser)
from data.format import displayed_size, raw_frame_warning  # noqa: E402

# defaults, each overridable as --key=value
voc_root = ""  # the VOCdevkit folder, holding VOC2007/ and/or VOC2012/
years = "2007,2012"  # the VOC years to read
splits = "train:trainval,val:test"  # output:ImageSet pairs
out_dir = os.path.dirname(os.path.abspath(__file__))  # where <split>.json goes (by default this folder)
download = False  # fetch and unpack the official tarballs into voc_root first (needs internet)

CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]
TARBALLS = {
    "2007": ["http://host.robots.ox.ac.uk/pascal/VOC/voc2007/VOCtrainval_06-Nov-2007.tar",
             "http://host.robots.ox.ac.uk/pascal/VOC/voc2007/VOCtest_06-Nov-2007.tar"],
    "2012": ["http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar"],
}


def parse_annotation(xml_path, jpeg_path, log):
    """One image's record, or None (logged) when the image must be skipped."""
    if not os.path.isfile(xml_path):
        log(f"skip image: missing annotation {xml_path}")
        return None
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as e:
        log(f"skip image: cannot parse {xml_path} ({e})")
        return None
    try:
        width, height = displayed_size(jpeg_path)  # the header only: proof the file is there, and its size as shown
    except (OSError, SyntaxError) as e:
        log(f"skip image: cannot read {jpeg_path} ({type(e).__name__})")
        return None
    size = [int(float(root.findtext(f"size/{k}") or 0)) for k in ("width", "height")]
    # (a second header read: only then)
    warning = raw_frame_warning(jpeg_path, *size) if size != [width, height] else None
    if warning:
        log(warning)
    record = {"file": os.path.abspath(jpeg_path), "width": width, "height": height,
              "boxes": [], "labels": [], "difficult": []}
    for i, obj in enumerate(root.iter("object")):
        name = (obj.findtext("name") or "").strip()
        if name not in CLASSES:
            log(f"skip object {i}: unknown class '{name}' in {xml_path}")
            continue
        try:
            xmin, ymin, xmax, ymax = (float(obj.find("bndbox").findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        except (AttributeError, TypeError, ValueError):
            log(f"skip object {i}: missing or malformed bndbox in {xml_path}")
            continue
        box = [xmin - 1, ymin - 1, xmax, ymax]  # 1-based inclusive -> 0-based, x1 exclusive
        if xmax <= xmin or ymax <= ymin:
            log(f"skip object {i}: empty box {[xmin, ymin, xmax, ymax]} in {xml_path}")
            continue
        if box[0] < 0 or box[1] < 0 or box[2] > width or box[3] > height:
            log(f"skip object {i}: box {[xmin, ymin, xmax, ymax]} outside the {width}x{height} image in {xml_path}")
            continue
        record["boxes"].append(box)
        record["labels"].append(CLASSES.index(name))
        record["difficult"].append(int((obj.findtext("difficult") or "0").strip() or 0))
    return record


def prepare(voc_root, years, splits, out_dir, log=print):
    """Write out_dir/<split>.json for every output split; returns {split: (images, objects, difficult)}."""
    if not os.path.isdir(voc_root) or not any(os.path.isdir(os.path.join(voc_root, f"VOC{y}")) for y in years):
        raise SystemExit(f"error: {voc_root!r} is not a VOCdevkit folder (expected VOC2007/ or VOC2012/ inside it; "
                         "--download fetches them)")
    os.makedirs(out_dir, exist_ok=True)
    counts = {}
    for split, image_set in splits:
        records, skipped_images, skipped_objects = [], 0, 0

        def counting_log(line):
            nonlocal skipped_images, skipped_objects
            skipped_images += line.startswith("skip image")
            skipped_objects += line.startswith("skip object")
            log(line)

        for year in years:
            folder = os.path.join(voc_root, f"VOC{year}")
            list_path = os.path.join(folder, "ImageSets", "Main", f"{image_set}.txt")
            if not os.path.isfile(list_path):
                log(f"note: VOC{year} has no {list_path}: not part of '{split}'")
                continue
            with open(list_path) as f:
                ids = [line.split()[0] for line in f if line.strip()]
            for image_id in ids:
                record = parse_annotation(os.path.join(folder, "Annotations", f"{image_id}.xml"),
                                          os.path.join(folder, "JPEGImages", f"{image_id}.jpg"), counting_log)
                if record is not None:
                    records.append(record)
        if not records:
            log(f"note: '{split}' has no images: {split}.json not written")
            continue
        with open(os.path.join(out_dir, f"{split}.json"), "w") as f:
            json.dump({"classes": CLASSES, "images": records}, f)
        objects = sum(len(r["labels"]) for r in records)
        difficult = sum(sum(r["difficult"]) for r in records)
        counts[split] = (len(records), objects, difficult)
        log(f"{split}: {len(records)} images, {objects} objects ({difficult} difficult); skipped "
            f"{skipped_images} images, {skipped_objects} objects -> {os.path.join(out_dir, split + '.json')}")
    return counts


def fetch(voc_root, years):
    """Download and unpack the official tarballs (they unpack to VOCdevkit/VOC20xx)."""
    from tqdm import tqdm

    parent = os.path.dirname(os.path.abspath(voc_root))
    os.makedirs(parent, exist_ok=True)
    for year in years:
        for url in TARBALLS[year]:
            path = os.path.join(parent, os.path.basename(url))
            if not os.path.isfile(path):
                try:
                    with urllib.request.urlopen(url, timeout=30) as r, open(path + ".part", "wb") as f:
                        with tqdm(total=int(r.headers.get("Content-Length", 0)), unit="B", unit_scale=True,
                                  desc=os.path.basename(url)) as bar:
                            while chunk := r.read(1 << 20):
                                f.write(chunk)
                                bar.update(len(chunk))
                except OSError as e:
                    raise SystemExit(f"error: cannot download {url} ({e}); download it by hand into {parent}")
                os.replace(path + ".part", path)
            with tarfile.open(path) as tar:
                tar.extractall(parent, filter="data")
    if os.path.basename(os.path.abspath(voc_root)) != "VOCdevkit":
        print(f"note: the tarballs unpack to {os.path.join(parent, 'VOCdevkit')}")


if __name__ == "__main__":
    globals().update(configure({k: globals()[k] for k in ("voc_root", "years", "splits", "out_dir", "download")},
                               sys.argv[1:]))
    if not voc_root:
        sys.exit("error: give --voc_root=/path/to/VOCdevkit (add --download to fetch VOC first)")
    years = [y.strip() for y in years.split(",")]
    if unknown := [y for y in years if y not in TARBALLS]:
        sys.exit(f"error: unknown year {unknown[0]} (VOC years: 2007, 2012)")
    splits = [tuple(s.split(":")) for s in splits.split(",")]
    if download:
        fetch(voc_root, years)
    prepare(voc_root, years, splits, out_dir)
