"""COCO-format data: data/coco/prepare.py, detections written back as COCO results, the official
model's class rows, and COCO AP through the whole path equal to pycocotools."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from lib import metrics
import train
from data.format import read_dataset_json
from lib import weights
from conftest import ROOT, load_script
from detr import DETR
from lib.weights import COCO_CLASSES
from test_metrics import coco_export


def write_images(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    for im in images:
        Image.new("RGB", (im["width"], im["height"]), (90, 120, 150)).save(folder / im["file_name"])


def test_prepare_converts_ids_boxes_crowds_and_logs_skips(tmp_path):
    images = [{"id": 42, "file_name": "a.png", "width": 64, "height": 48},
              {"id": 7, "file_name": "b.png", "width": 32, "height": 32},   # no annotation: kept
              {"id": 9, "file_name": "gone.png", "width": 32, "height": 32}]  # missing file: skipped
    write_images(tmp_path / "img", images[:2])
    annotations = [
        {"id": 1, "image_id": 42, "category_id": 17, "bbox": [10, 5, 20, 10], "area": 150.0, "iscrowd": 0},
        {"id": 2, "image_id": 42, "category_id": 3, "bbox": [0, 0, 64, 48], "area": 900.0, "iscrowd": 1},
        {"id": 3, "image_id": 42, "category_id": 5, "bbox": [50, 40, 30, 30]},  # clipped to the image
        {"id": 4, "image_id": 42, "category_id": 99, "bbox": [1, 1, 5, 5]},     # unknown category
        {"id": 5, "image_id": 42, "category_id": 3, "bbox": [1, 1, 0, 5]},      # no width
        {"id": 6, "image_id": 42, "category_id": 3, "bbox": [1, 1, "x", 5]},    # malformed
        {"id": 7, "image_id": 1234, "category_id": 3, "bbox": [1, 1, 5, 5]},    # unknown image
        {"id": 8, "image_id": 9, "category_id": 3, "bbox": [1, 1, 5, 5]},       # its image was skipped
    ]
    categories = [{"id": 17, "name": "dog"}, {"id": 3, "name": "car"}, {"id": 5, "name": "kite"}]
    (tmp_path / "ann.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                   "categories": categories}))
    lines = []
    prepare = load_script("data/coco/prepare.py")
    assert prepare.prepare(str(tmp_path / "ann.json"), str(tmp_path / "img"), str(tmp_path / "out"), "val",
                           lines.append) == (2, 3, 1)
    data = json.loads((tmp_path / "out" / "val.json").read_text())
    assert data["classes"] == ["car", "kite", "dog"] and data["category_ids"] == [3, 5, 17]
    b, a = data["images"]  # sorted by id
    assert (a["id"], a["width"], a["height"], b["id"], b["labels"]) == (42, 64, 48, 7, [])
    assert a["boxes"] == [[10, 5, 30, 15], [0, 0, 64, 48], [50, 40, 64, 48]]
    assert a["labels"] == [2, 0, 1] and a["iscrowd"] == [0, 1, 0] and a["area"] == [150.0, 900.0, 900.0]
    assert sum(line.startswith("skip image") for line in lines) == 1
    assert sum(line.startswith("skip object") for line in lines) == 4  # the one on a skipped image is not counted twice
    assert lines[-1].startswith("val: 2 images (1 without objects), 3 objects (1 crowds), 3 classes; "
                                "skipped 1 images, 4 objects")
    read_dataset_json(tmp_path / "out" / "val.json")  # train.py reads it


def test_detections_written_back_are_scored_by_pycocotools_as_by_compute_map(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    ground_truth, results = coco_export(np.random.default_rng(3), num_images=40)
    write_images(tmp_path / "img", ground_truth["images"])
    (tmp_path / "ann.json").write_text(json.dumps(ground_truth))
    load_script("data/coco/prepare.py").prepare(str(tmp_path / "ann.json"), str(tmp_path / "img"),
                                                str(tmp_path), "val", lambda line: None)
    data = read_dataset_json(tmp_path / "val.json")
    # the results as a model would give them: per record, in label space, through coco_results back to ids
    label = {c: k for k, c in enumerate(data["category_ids"])}
    detections = []
    for r in data["images"]:
        mine = [d for d in results if d["image_id"] == r["id"]]
        boxes = torch.tensor([d["bbox"] for d in mine], dtype=torch.float64).reshape(-1, 4)
        detections.append({"boxes": torch.cat([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], 1),
                           "scores": torch.tensor([d["score"] for d in mine], dtype=torch.float64),
                           "labels": torch.tensor([label[d["category_id"]] for d in mine], dtype=torch.int64)})
    written = metrics.coco_results(detections, [r["id"] for r in data["images"]], data["category_ids"])
    assert len(written) == len(results)
    coco = COCO(str(tmp_path / "ann.json"))
    evaluator = COCOeval(coco, coco.loadRes(written), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    m = metrics.compute_map(detections, [metrics.ground_truth(r) for r in data["images"]], len(data["classes"]))
    ours = [m["mAP"], m["mAP75"], m["mAP_small"], m["mAP_medium"], m["mAP_large"], m["AR100"]]
    assert ours == pytest.approx([evaluator.stats[i] for i in (0, 2, 3, 4, 5, 8)], abs=1e-4)  # json rounds to 1e-3 px
    assert m["mAP"] > 0.05


def test_official_model_keeps_its_rows_for_coco_classes(tmp_path):
    images = [{"id": i, "file_name": f"{i}.png", "width": 64, "height": 64} for i in (1, 2)]
    write_images(tmp_path / "img", images)
    annotations = [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [4, 4, 30, 30], "iscrowd": 0},
                   {"id": 2, "image_id": 2, "category_id": 1, "bbox": [10, 8, 20, 40], "iscrowd": 0}]
    categories = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}]
    (tmp_path / "ann.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                   "categories": categories}))
    prepare = load_script("data/coco/prepare.py")
    for split in ("train", "val"):
        prepare.prepare(str(tmp_path / "ann.json"), str(tmp_path / "img"), str(tmp_path / "data"), split,
                        lambda line: None)
    official = DETR(num_classes=91, backbone="resnet18", hidden_dim=32, num_heads=8, num_encoder_layers=1,
                    num_decoder_layers=1, dim_feedforward=64, num_queries=8)
    with torch.no_grad():  # every query says "person": its detections are written under COCO's id for it
        official.class_head.bias[COCO_CLASSES.index("person")] = 10.0
    torch.save({"model": {weights.minidetr_to_official_key(k): v for k, v in official.state_dict().items()}},
               tmp_path / "official.pth")
    config = train.get_config([])
    config.update(dataset=str(tmp_path / "data"), out_dir=str(tmp_path / "out"),
                  init_from=str(tmp_path / "official.pth"), backbone="resnet18", hidden_dim=32, num_encoder_layers=1,
                  num_decoder_layers=1, dim_feedforward=64, num_queries=8, eval_only=True, batch_size=2, num_workers=0,
                  val_scale=64, max_size=96, device="cpu", dtype="float32")
    model, _ = train.train(config)
    rows = [COCO_CLASSES.index("person"), COCO_CLASSES.index("car"), 91]
    assert torch.equal(model.class_head.weight, official.class_head.weight[rows])
    assert torch.equal(model.class_head.bias, official.class_head.bias[rows])
    # the one way to write detections: sample.py --json, of a prepared split with its own ids, classes by name
    result = subprocess.run([sys.executable, "sample.py", f"--ckpt={tmp_path / 'official.pth'}",
                             f"--dataset={tmp_path / 'data'}", "--split=val", f"--json={tmp_path / 'detections.json'}",
                             "--threshold=0"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    written = json.loads((tmp_path / "detections.json").read_text())
    assert {d["image_id"] for d in written} == {1, 2} and {d["category_id"] for d in written} == {1}
    assert len(written) == 2 * 8 and all(len(d["bbox"]) == 4 for d in written)
