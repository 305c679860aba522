"""tools/eval.py's report: per-class numbers as compute_map and train.py give them, precision, recall and the
confusion matrix counted by hand, classes matched by name, and the worst images drawn."""

import csv
import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from lib import inference
import train
from conftest import load_script
from data.pipeline import DetectionDataset, val_transform
from detr import DETR
from lib.metrics import compute_map

BOX = [24, 24, 72, 40]  # where every query of fixed_box_model puts its box on a 96x64 image


def fixed_box_model(classes):
    """A tiny DETR whose 3 queries all say: class 1 at BOX, sure of it (as tests/test_sample.py's)."""
    torch.manual_seed(0)
    model = DETR(num_classes=3, backbone="resnet18", hidden_dim=32, num_heads=4, num_encoder_layers=1,
                 num_decoder_layers=1, dim_feedforward=64, num_queries=3)
    with torch.no_grad():
        model.class_head.weight.zero_()
        model.class_head.bias.copy_(torch.tensor([0.0, 10.0, 0.0, 0.0]))
        model.box_head[-1].weight.zero_()
        model.box_head[-1].bias.copy_(torch.logit(torch.tensor([0.5, 0.5, 0.5, 0.25])))
    model.classes = list(classes)
    return model.eval()


def three_images(folder, classes=("a", "b", "c")):
    """img0: a "b" at BOX (1 true positive, 2 duplicates); img1: an "a" at BOX (taken for a "b": a
    confusion, 2 more false positives); img2: a "c" in the corner (missed, 3 false positives)."""
    folder.mkdir(exist_ok=True)
    label = {c.lower(): i for i, c in enumerate(classes)}
    objects = [("b", BOX), ("a", BOX), ("c", [0, 0, 20, 20])]
    records = []
    for i, (name, box) in enumerate(objects):
        Image.new("RGB", (96, 64), (30 * i, 60, 90)).save(folder / f"img{i}.png")
        records.append({"file": f"img{i}.png", "width": 96, "height": 64, "boxes": [box], "labels": [label[name]]})
    (folder / "val.json").write_text(json.dumps({"classes": list(classes), "images": records}))
    return DetectionDataset(folder / "val.json", val_transform(64, 200))


@pytest.fixture
def evaluation(tmp_path):
    module = load_script("tools/eval.py")
    module.num_workers, module.max_dets = 0, 100
    return module


def run_report(evaluation, model, data, out_dir):
    predictions = evaluation.predict(model, data, "cpu", batch_size=2)
    return evaluation.report(model, data, predictions, str(out_dir), threshold=0.5)


def test_report_counts_every_kind_of_error_as_by_hand(evaluation, tmp_path):
    data = three_images(tmp_path / "data")
    run_report(evaluation, fixed_box_model(["a", "b", "c"]), data, tmp_path / "report")
    with open(tmp_path / "report" / "per_class.csv") as f:
        rows = {r["class"]: r for r in csv.DictReader(f)}
    assert list(rows["a"]) == ["class", "objects", "AP", "AP50", "AP75", "AR100", "precision", "recall"]
    assert {c: int(r["objects"]) for c, r in rows.items()} == {"a": 1, "b": 1, "c": 1}
    # "b": 9 detections above 0.5, one of them right (exact box: AP 1 at every IoU)
    assert float(rows["b"]["precision"]) == pytest.approx(1 / 9) and float(rows["b"]["recall"]) == 1.0
    assert [float(rows["b"][k]) for k in ("AP", "AP50", "AP75", "AR100")] == [1.0, 1.0, 1.0, 1.0]
    assert rows["a"]["precision"] == "nan" and float(rows["a"]["recall"]) == 0.0 and float(rows["c"]["AP"]) == 0.0
    with open(tmp_path / "report" / "confusion_matrix.csv") as f:
        matrix = list(csv.reader(f))
    assert matrix[0] == ["true \\ predicted", "a", "b", "c", "missed"]
    assert [r[0] for r in matrix[4:]] == ["duplicate", "poor localisation", "background"]
    assert [r[1:] for r in matrix[1:]] == [["0", "1", "0", "0"],   # the "a" taken for a "b"
                                           ["0", "1", "0", "0"],   # the "b" found
                                           ["0", "0", "0", "1"],   # the "c" missed
                                           ["0", "4", "0", "0"],   # 2 + 2 on an object already found
                                           ["0", "0", "0", "0"],
                                           ["0", "3", "0", "0"]]   # 3 on nothing
    with open(tmp_path / "report" / "errors.csv") as f:
        errors = {r["class"]: r for r in csv.DictReader(f)}
    assert {k: int(v) for k, v in errors["b"].items() if k != "class"} == {
        "objects": 1, "true positives": 1, "duplicate": 4, "wrong class": 1, "poor localisation": 0, "background": 3,
        "missed": 0}
    assert errors["c"]["missed"] == "1" and errors["all"]["objects"] == "3" and errors["all"]["missed"] == "1"
    def not_json(constant):
        raise ValueError(f"{constant} is not JSON")

    summary = json.loads((tmp_path / "report" / "summary.json").read_text(), parse_constant=not_json)
    assert summary["mAP"] == pytest.approx(1 / 3) and summary["images"] == 3
    assert summary["mAP_large"] is None  # no large object: NaN in compute_map, null in the file
    # worst/: img2 with 4 errors, img1 with 3 (its "a" is a wrong class, not missed: TIDE), img0 with 2, each
    # at least 512 pixels on its short side
    worst = sorted(p.name for p in (tmp_path / "report" / "worst").iterdir())
    assert worst == ["00_img2.png", "01_img1.png", "02_img0.png"]
    picture = np.asarray(Image.open(tmp_path / "report" / "worst" / "00_img2.png").convert("RGB"))
    assert min(picture.shape[:2]) >= 512
    below_title = picture[40:]  # the title line has a swatch of each colour
    for kind in ("false positive", "missed"):  # img2 has both, and no true positive
        assert (below_title == evaluation.COLOURS[kind]).all(-1).sum() > 100
    assert not (below_title == evaluation.COLOURS["true positive"]).all(-1).any()


def test_per_class_numbers_equal_train_evaluate_and_compute_map(evaluation, tmp_path):
    """On a model with random weights (varied boxes and scores) the report's AP column and means are
    train.py's evaluation of the same model on the same split, and compute_map's."""
    data = three_images(tmp_path / "data")
    torch.manual_seed(3)
    model = DETR(num_classes=3, backbone="resnet18", hidden_dim=32, num_heads=4, num_encoder_layers=1,
                 num_decoder_layers=1, dim_feedforward=64, num_queries=30).eval()
    model.classes = ["a", "b", "c"]
    with torch.no_grad():  # boxes scattered about BOX, classes and scores varied
        model.class_head.bias.copy_(torch.tensor([1.0, 1.0, 1.0, 0.0]))
        model.box_head[-1].bias.copy_(torch.logit(torch.tensor([0.5, 0.5, 0.5, 0.25])))
    result = run_report(evaluation, model, data, tmp_path / "report")
    cfg = train.get_config(["--batch_size=2", "--num_workers=0", "--dtype=float32"])
    logged = inference.evaluate(model, data, SimpleNamespace(**cfg), "cpu")
    with open(tmp_path / "report" / "per_class.csv") as f:
        ap = [float(r["AP"]) for r in csv.DictReader(f)]
    assert ap == pytest.approx(logged["AP_per_class"], abs=1e-6) and result["mAP"] == logged["mAP"]
    for key, value in logged.items():
        assert result[key] == pytest.approx(value, nan_ok=True)
    table = (tmp_path / "report" / "per_class.md").read_text().splitlines()
    assert table[-1].split("|")[3].strip() == f"{logged['mAP']:.3f}" and len(table) == 2 + 3 + 1
    assert any(0 < v < 1 for v in ap)  # a real curve, not all or nothing


def test_classes_listed_in_another_order_give_the_same_per_class_numbers(evaluation, tmp_path):
    model = fixed_box_model(["a", "b", "c"])
    run_report(evaluation, model, three_images(tmp_path / "one"), tmp_path / "r1")
    run_report(evaluation, model, three_images(tmp_path / "two", classes=("C", "a", "B")), tmp_path / "r2")
    rows = []
    for report in ("r1", "r2"):
        with open(tmp_path / report / "per_class.csv") as f:
            rows.append({r["class"].lower(): r for r in csv.DictReader(f)})
    assert sorted(rows[0]) == sorted(rows[1]) == ["a", "b", "c"]
    for name in "abc":
        assert ({k: v for k, v in rows[0][name].items() if k != "class"}
                == {k: v for k, v in rows[1][name].items() if k != "class"})


def test_compute_map_matches_are_in_the_callers_order():
    """details=True: each detection's matched object and ignored flag, in the order the detections came."""
    boxes = torch.tensor([[0, 0, 10, 10], [50, 50, 60, 60], [0, 0, 10, 10], [0, 0, 11, 10]], dtype=torch.float64)
    det = {"boxes": boxes, "scores": torch.tensor([0.2, 0.9, 0.8, 0.5]), "labels": torch.tensor([0, 0, 0, 0])}
    gt = {"boxes": torch.tensor([[0, 0, 10, 10], [50, 50, 60, 60.0]]), "labels": torch.tensor([0, 0]),
          "difficult": torch.tensor([False, True])}
    result = compute_map([det], [gt], 1, details=True)
    match, ignored = result["matches"][0]
    # by score: det 1 takes the difficult object (ignored), det 2 the real one, dets 3 and 0 are left
    assert match.tolist() == [-1, 1, 0, -1] and ignored.tolist() == [False, True, False, False]
    assert result["per_class"]["objects"] == [1]


def test_a_checkpoint_is_evaluated_as_its_run_evaluated_it(evaluation, tmp_path, monkeypatch):
    """tools/eval.py batches and pads as the checkpoint's own run did (its batch_size and pad_to), since DETR's
    outputs change with the padding: its numbers are then exactly train.py's for that checkpoint."""
    folder = tmp_path / "data"
    folder.mkdir()
    records = []
    for i, (w, h) in enumerate([(96, 64), (64, 96), (80, 64), (96, 48)]):
        Image.new("RGB", (w, h), (50 * i, 120, 200 - 40 * i)).save(folder / f"{i}.png")
        records.append({"file": f"{i}.png", "width": w, "height": h, "boxes": [[10, 10, 40, 30]], "labels": [i % 3]})
    (folder / "val.json").write_text(json.dumps({"classes": ["a", "b", "c"], "images": records}))
    torch.manual_seed(1)
    model = DETR(num_classes=3, backbone="resnet18", hidden_dim=32, num_heads=4, num_encoder_layers=1,
                 num_decoder_layers=1, dim_feedforward=64, num_queries=30).eval()
    with torch.no_grad():
        model.box_head[-1].bias.copy_(torch.logit(torch.tensor([0.3, 0.3, 0.3, 0.3])))
    cfg = train.get_config([f"--dataset={folder}", "--batch_size=2", "--pad_to=32", "--val_scale=64", "--max_size=200",
                            "--train_scales=[64]", "--crop_scales=[64]", "--crop_size=(48, 64)",
                            "--num_workers=0", "--dtype=float32", "--max_dets=5"])
    torch.save({"model": model.state_dict(), "model_args": model.config, "classes": ["a", "b", "c"], "config": cfg},
               tmp_path / "best.pt")
    evaluation.max_dets = 0  # the default: the checkpoint's own
    evaluation.ckpt, evaluation.out_dir = str(tmp_path / "best.pt"), str(tmp_path / "report")
    report = evaluation.report
    seen = {}
    monkeypatch.setattr(evaluation, "report", lambda model, data, predictions, *args: seen.update(
        predictions=predictions, result=report(model, data, predictions, *args)))
    evaluation.main()
    data = DetectionDataset(folder / "val.json", val_transform(64, 200))
    logged = inference.evaluate(model, data, SimpleNamespace(**cfg), "cpu")
    assert seen["result"]["AP_per_class"] == logged["AP_per_class"] and seen["result"]["mAP"] == logged["mAP"]
    assert seen["result"]["AR5"] == logged["AR5"]  # the run's max_dets, not COCO's 100
    # the detections are those of the run's batches, and the padding matters: one image at a time gives other boxes
    padded = evaluation.predict(model, data, "cpu", batch_size=2, num_workers=0, pad_to=32)
    alone = evaluation.predict(model, data, "cpu", batch_size=1, num_workers=0)
    assert all(torch.equal(seen["predictions"][i]["boxes"], padded[i]["boxes"]) for i in padded)
    assert not all(torch.equal(alone[i]["boxes"], padded[i]["boxes"]) for i in padded)


def test_without_matplotlib_the_figures_are_one_logged_skip(evaluation, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails, as where it is not installed
    run_report(evaluation, fixed_box_model(["a", "b", "c"]), three_images(tmp_path / "data"), tmp_path / "report")
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == [
        "by_object_count.csv", "confusion_matrix.csv", "errors.csv", "per_class.csv", "per_class.md", "summary.json",
        "worst"]
    assert ("skip: pr_curves.png, confusion_matrix.png and by_object_count.png need matplotlib"
            in capsys.readouterr().out)


def test_false_positives_are_sorted_into_tides_kinds(evaluation):
    """One object of class 0 at [0, 0, 10, 10], one of class 1 at [20, 0, 30, 10]: a true positive, a
    duplicate on the first, a class-0 box on the second (wrong class), a box half off the first (poor
    localisation) and one far away (background); the second object, taken by the wrong class, is not missed."""
    gt = {"boxes": torch.tensor([[0.0, 0, 10, 10], [20, 0, 30, 10]]), "labels": torch.tensor([0, 1])}
    det = {"boxes": torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 9.5], [20, 0, 30, 10], [5, 0, 15, 10],
                                  [50, 50, 60, 60]]),
           "scores": torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5]), "labels": torch.tensor([0, 0, 0, 0, 0])}
    match, ignored = torch.tensor([0, -1, -1, -1, -1]), torch.zeros(5, dtype=torch.bool)
    tp, fp, missed, kinds, objects = evaluation.image_errors(match, ignored, det, gt, 0.3)
    assert tp.tolist() == [0] and fp.tolist() == [1, 2, 3, 4] and missed.tolist() == []
    assert kinds == ["duplicate", "wrong class", "poor localisation", "background"] and objects == [-1, 1, -1, -1]
    # a worst/ picture's title counts them as their boxes are labelled: the second object as a wrong class
    counts = [text for text, _ in evaluation.error_counts((tp, fp, missed, kinds, objects))]
    assert counts == ["true positives: 1", "duplicate: 1", "wrong class: 1", "poor localisation: 1", "background: 1",
                      "missed: 0"]
    _, fp, missed, kinds, _ = evaluation.image_errors(match, ignored, det, gt, 0.75)  # the wrong class below it
    assert ([text for text, _ in evaluation.error_counts((tp, fp, missed, kinds, []))][-2:]
            == ["duplicate: 1", "missed: 1"])


def test_layers_give_the_papers_fig_4_and_end_at_the_reports_numbers(evaluation, tmp_path):
    """tools/eval.py --layers: COCO's AP and AP50 after each decoder layer, without and with class-wise NMS; the last
    layer without NMS is the report's own mAP and AP50 (per_class.md's mean row)."""
    pytest.importorskip("matplotlib")
    three_images(tmp_path / "data")
    torch.manual_seed(3)
    model = DETR(num_classes=3, backbone="resnet18", hidden_dim=32, num_heads=4, num_encoder_layers=1,
                 num_decoder_layers=2, dim_feedforward=64, num_queries=12).eval()
    with torch.no_grad():  # boxes near the objects, so that the APs are not all 0
        model.box_head[-1].bias.copy_(torch.logit(torch.tensor([0.5, 0.45, 0.4, 0.4])))
    model.classes = ["a", "b", "c"]
    cfg = {"dataset": str(tmp_path / "data"), "val_split": "val", "val_scale": 64, "max_size": 200, "batch_size": 2}
    torch.save({"model": model.state_dict(), "model_args": model.config, "classes": model.classes, "config": cfg},
               tmp_path / "best.pt")
    evaluation.ckpt, evaluation.out_dir, evaluation.layers, evaluation.max_dets = (str(tmp_path / "best.pt"),
                                                                                   str(tmp_path / "r"), True, 0)
    evaluation.main()
    with open(tmp_path / "r" / "layers.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["layer"], r["nms"]) for r in rows] == [("1", "False"), ("1", "True"), ("2", "False"), ("2", "True")]
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    with open(tmp_path / "r" / "per_class.csv") as f:
        per_class = [r for r in csv.DictReader(f) if int(r["objects"]) > 0 and r["AP50"] != "nan"]
    assert float(rows[2]["AP"]) == summary["mAP"] and summary["mAP"] > 0
    assert float(rows[2]["AP50"]) == pytest.approx(sum(float(r["AP50"]) for r in per_class) / len(per_class), abs=1e-6)
    assert (tmp_path / "r" / "layers.png").exists()
    with open(tmp_path / "r" / "by_object_count.csv") as f:  # one object an image, then all
        counts = list(csv.DictReader(f))
    assert ([(r["objects an image holds"], r["images"], r["objects"]) for r in counts]
            == [("1", "3", "3"), ("all", "3", "3")])
    single = DETR(**{**model.config, "num_decoder_layers": 1})
    torch.save({"model": single.state_dict(), "model_args": single.config, "classes": model.classes, "config": cfg},
               tmp_path / "one.pt")
    evaluation.ckpt = str(tmp_path / "one.pt")
    with pytest.raises(SystemExit, match="--layers compares the decoder's layers"):
        evaluation.main()
