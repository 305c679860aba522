"""data/yolo/prepare.py: a YOLO dataset (ultralytics' and Roboflow's layout) into the one format, on a
tiny generated set: boxes and polygons to displayed pixels, images without labels kept, bad lines skipped."""

import json
import runpy
import sys

import pytest
from PIL import Image

from conftest import ROOT, load_script
from data.format import read_dataset_json


def yolo_set(root):
    """images/{train,val}, labels/{train,val} and a data.yaml (names as a dict, val as a txt list)."""
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
    Image.new("RGB", (200, 100)).save(root / "images" / "train" / "a.jpg")
    Image.new("RGB", (50, 40)).save(root / "images" / "train" / "b.png")
    Image.new("RGB", (60, 60)).save(root / "images" / "train" / "c.jpg")  # no label file: no objects
    (root / "images" / "train" / "broken.jpg").write_bytes(b"not an image")
    Image.new("RGB", (80, 80)).save(root / "images" / "val" / "v.jpg")
    (root / "labels" / "train" / "a.txt").write_text(
        "0 0.5 0.5 0.2 0.4\n"  # a box: 80..120 x 30..70
        "1 0.1 0.2 0.3 0.2 0.3 0.6 0.1 0.6\n"  # a polygon: its box 20..60 x 20..60
        "2 0.5 0.5 0.1 0.1\n"  # class 2 of 2 classes: skipped
        "0 0.5 0.5 0 0.3\n"  # no area: skipped
        "1 0.5 abc 0.1 0.1\n"  # malformed: skipped
        "0 0.5 0.5\n")  # too few numbers: skipped
    (root / "labels" / "train" / "b.txt").write_text("")  # empty: no objects
    (root / "labels" / "train" / "ghost.txt").write_text("0 0.5 0.5 0.1 0.1\n")  # no image: skipped
    (root / "labels" / "val" / "v.txt").write_text("1 0.25 0.25 0.5 0.5\n")
    (root / "val.txt").write_text("./images/val/v.jpg\n")
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: val.txt\nnames:\n  0: cat\n  1: dog\n")
    return root / "data.yaml"


def test_a_yolo_yaml_becomes_one_json_per_split(tmp_path, monkeypatch):
    yaml_path = yolo_set(tmp_path / "set")
    lines = []
    yolo = load_script("data/yolo/prepare.py")
    classes, splits = yolo.read_yaml(str(yaml_path))
    assert classes == ["cat", "dog"] and sorted(splits) == ["train", "val"]
    for split, paths in splits.items():
        yolo.prepare(paths, classes, str(tmp_path / "out"), split, log=lines.append)
    train = read_dataset_json(tmp_path / "out" / "train.json")  # the format's own checker passes it
    by_name = {r["file"].rsplit("/", 1)[1]: r for r in train["images"]}
    assert sorted(by_name) == ["a.jpg", "b.png", "c.jpg"] and train["classes"] == ["cat", "dog"]
    assert by_name["a.jpg"]["boxes"] == [[80, 30, 120, 70], [20, 20, 60, 60]] and by_name["a.jpg"]["labels"] == [0, 1]
    assert (by_name["b.png"]["boxes"] == by_name["c.jpg"]["boxes"] == []
            and (by_name["b.png"]["width"], by_name["b.png"]["height"]) == (50, 40))
    skips = [line for line in lines if line.startswith("skip")]
    assert (len(skips) == 6 and any("broken.jpg" in s for s in skips)
            and any("ghost.txt has no image" in s for s in skips))
    assert any("skipped 1 images, 4 objects, 0 duplicate lines, 1 label files without an image" in line
               for line in lines)
    val = read_dataset_json(tmp_path / "out" / "val.json")
    assert val["images"][0]["boxes"] == [[0, 0, 40, 40]] and val["images"][0]["labels"] == [1]


def test_a_plain_folder_and_names_from_the_command_line(tmp_path, monkeypatch):
    root = tmp_path / "flat"
    root.mkdir()
    Image.new("RGB", (100, 50)).save(root / "x.png")
    (tmp_path / "lab").mkdir()
    (tmp_path / "lab" / "x.txt").write_text("2 0.5 0.5 0.5 0.5\n")
    monkeypatch.setattr(sys, "argv", ["prepare.py", f"--images={root}", f"--labels={tmp_path / 'lab'}", "--names=a,b,c",
                                      "--split=val", f"--out_dir={tmp_path / 'out'}"])
    runpy.run_path(str(ROOT / "data" / "yolo" / "prepare.py"), run_name="__main__")
    record = json.loads((tmp_path / "out" / "val.json").read_text())["images"][0]
    assert record["boxes"] == [[25, 12.5, 75, 37.5]] and record["labels"] == [2]


def test_labels_are_checked_as_ultralytics_checks_them(tmp_path):
    """Pixels where fractions belong are a logged skip (clipping made them full-image boxes), duplicate lines
    are removed and counted, and a class id written 0.0 is class 0; a coordinate a hair outside [0, 1] is clipped."""
    (tmp_path / "labels.txt").write_text(
        "0 100 50 300 150\n"  # pixels of a 200x100 image: skipped
        "0 0.5 0.5 1.3 0.2\n"  # wider than the image: skipped
        "1 0.5 0.5 0.2 0.2\n"
        "1 0.5 0.5 0.2 0.2\n"  # a duplicate: removed
        "0.0 0.25 0.5 0.5 1.004\n")  # class 0, and a height a hair over 1: clipped to the image
    lines = []
    yolo = load_script("data/yolo/prepare.py")
    boxes, labels, skipped, duplicates = yolo.read_labels(str(tmp_path / "labels.txt"), 200, 100, 2, lines.append)
    assert boxes == [[80, 40, 120, 60], [0, 0, 100, 100]] and labels == [1, 0] and skipped == 2 and duplicates == 1
    assert sum("outside [0, 1]" in line and "not pixels" in line for line in lines) == 2
    assert any("1 duplicate lines, removed" in line for line in lines)


@pytest.mark.parametrize("yaml_text, message", [
    ("train: images/train\n", "needs names: a list of distinct class names"),
    ("names: [cat, cat]\ntrain: images/train\n", "needs names: a list of distinct class names"),
    ("names: [cat]\n", "names no split"),
    ("names: [cat]\ntrain: nowhere\n", "no such folder or txt list"),
    ("names: [cat]\ntrain: empty\n", "the train split has no image"),
    ("names: [cat\n", "is not valid yaml"),
])
def test_a_bad_yaml_is_one_error_line(tmp_path, monkeypatch, capsys, yaml_text, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "data.yaml").write_text(yaml_text)
    monkeypatch.setattr(sys, "argv", ["prepare.py", f"--yaml={tmp_path / 'data.yaml'}",
                                      f"--out_dir={tmp_path / 'out'}"])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(ROOT / "data" / "yolo" / "prepare.py"), run_name="__main__")
    assert stop.value.code.startswith("error: ") and message in stop.value.code and "\n" not in stop.value.code
