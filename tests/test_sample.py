"""sample.py: boxes land on their pixels, attention maps are distributions, detections are written."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from lib import draw
from conftest import load_script
from detr import DETR
from lib.weights import load_model


@pytest.fixture
def sample(tmp_path):
    module = load_script("sample.py")
    module.out_dir = str(tmp_path / "samples")
    return module


def fixed_box_model(num_queries=3):
    """A tiny DETR whose every query says: class 1 at (cx, cy, w, h) = (0.5, 0.5, 0.5, 0.25), sure of it."""
    torch.manual_seed(0)
    model = DETR(num_classes=3, backbone="resnet18", hidden_dim=32, num_heads=4, num_encoder_layers=1,
                 num_decoder_layers=1, dim_feedforward=64, num_queries=num_queries)
    with torch.no_grad():
        model.class_head.weight.zero_()
        model.class_head.bias.copy_(torch.tensor([0.0, 10.0, 0.0, 0.0]))
        last = model.box_head[-1]
        last.weight.zero_()
        last.bias.copy_(torch.logit(torch.tensor([0.5, 0.5, 0.5, 0.25])))
    return model


def save_checkpoint(model, path, classes):
    config = {"dataset": "nowhere", "val_split": "val", "val_scale": 64, "max_size": 200}
    torch.save({"model": model.state_dict(), "model_args": model.config, "classes": classes, "config": config}, path)


def test_drawn_box_is_exactly_the_predicted_rectangle(sample, tmp_path):
    save_checkpoint(fixed_box_model(num_queries=1), tmp_path / "ckpt.pt", ["a", "b", "c"])
    Image.new("RGB", (96, 64), (0, 0, 0)).save(tmp_path / "black.png")
    model, config = load_model(str(tmp_path / "ckpt.pt"))
    written = sample.sample(model, [str(tmp_path / "black.png")], sample.out_dir)
    pixels = np.asarray(Image.open(written[0]).convert("RGB"))
    assert pixels.shape == (512, 768, 3)  # a 96x64 image is drawn 8 times larger, to a short side of 512
    colour = np.array(draw.class_colour(1))
    is_colour = (pixels == colour).all(-1)
    # the box: x 24..72, y 24..40 of the image, so 192..576, 192..320 of the picture; a 2-pixel outline
    x0, y0, x1, y1 = 192, 192, 576, 320
    outline = np.zeros_like(is_colour)
    outline[y0 : y1 + 1, x0 : x1 + 1] = True
    outline[y0 + 2 : y1 - 1, x0 + 2 : x1 - 1] = False
    assert is_colour[outline].all()
    # the label sits on the box's top-left corner, above it: the only colour outside the outline
    label = is_colour & ~outline
    rows, columns = np.nonzero(label)
    assert rows.max() < y0 and rows.min() > y0 - 40 and columns.min() >= x0 and columns.max() < x1
    assert not is_colour[y1 + 1 :].any() and not is_colour[y0 + 3 : y1 - 2, x0 + 3 : x1 - 2].any()


def test_labels_stay_inside_the_picture_and_apart(sample):
    """Labels of boxes on the picture's edges are moved in, and boxes in one place get labels that do
    not cover each other; the first label goes above its box's top-left corner."""
    W, H = 600, 512
    # ... and eight wide labels on one box no taller than a label (the corners' places are all taken)
    boxes = ([(0, 0, 80, 60), (520, 450, 600, 512), (590, 100, 600, 140)] + [(200, 200, 300, 300)] * 4
             + [(400, 300, 410, 310)] * 8)
    sizes = [(150, 20), (120, 20), (90, 20)] + [(60, 20)] * 4 + [(180, 20)] * 8
    placed = draw.place_labels(boxes, sizes, (W, H))
    for (x, y, w, h), size in zip(placed, sizes):
        assert (w, h) == size and 0 <= x <= W - w and 0 <= y <= H - h
    assert placed[3][:2] == (200, 180)  # free: above the top-left corner

    def overlap(a, b):
        return min(a[0] + a[2], b[0] + b[2]) > max(a[0], b[0]) and min(a[1] + a[3], b[1] + b[3]) > max(a[1], b[1])

    assert not any(overlap(a, b) for i, a in enumerate(placed) for b in placed[i + 1 :])
    # and drawn: each label a block of its colour, inside the picture
    picture = Image.new("RGB", (W, H), "white")
    colours = [(255, 0, 0), (0, 0, 255), (0, 160, 0)]
    draw.draw_boxes(picture, torch.tensor(boxes[:3], dtype=torch.float32), ["top left", "bottom right", "edge"],
                    colours)
    pixels = np.asarray(picture)
    for colour in colours:
        assert (pixels == colour).all(-1).sum() > 200


def test_attention_maps_are_distributions_over_the_feature_map(sample, tmp_path):
    model = fixed_box_model().eval()
    outputs = model(torch.randn(1, 3, 64, 96), need_weights=True)
    assert outputs["feat_size"] == (2, 3)
    maps = sample.attention_maps(outputs["dec_attn"][-1][0], outputs["feat_size"])
    assert maps.shape == (3, 2, 3)
    assert torch.allclose(maps.sum((1, 2)), torch.ones(3))
    encoder = sample.attention_maps(outputs["enc_attn"][-1][0], outputs["feat_size"])
    assert encoder.shape == (6, 2, 3) and torch.allclose(encoder.sum((1, 2)), torch.ones(6))
    # and the --attention path draws one grid per image
    save_checkpoint(model, tmp_path / "ckpt.pt", ["a", "b", "c"])
    Image.new("RGB", (96, 64), (40, 40, 40)).save(tmp_path / "grey.jpg")
    written = sample.sample(load_model(str(tmp_path / "ckpt.pt"))[0], [str(tmp_path / "grey.jpg")], sample.out_dir,
                            attention=True)
    assert [p.rsplit("/", 1)[1] for p in written] == ["grey.png", "grey_attention.png"]
    # detections panel, 3 query panels, 3 encoder panels: a 4-column grid of two rows of 768x512 panels,
    # each under a title line
    band = draw.text_font(Image.new("RGB", (768, 512))).size + 10
    assert Image.open(written[1]).size == (4 * 768, 2 * (512 + band))


def test_bad_input_gives_one_line(sample, tmp_path, capsys):
    save_checkpoint(fixed_box_model(), tmp_path / "ckpt.pt", ["a", "b", "c"])
    with pytest.raises(Exception, match="no checkpoint file at"):
        load_model(str(tmp_path / "missing.pt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no images"):
        sample.image_paths(str(tmp_path / "empty"), None, [])
    with pytest.raises(SystemExit, match="no image or folder"):
        sample.image_paths(str(tmp_path / "nope.jpg"), None, [])
    bad = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    bad["classes"] = ["a", "b"]
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(Exception, match="the model has 3 classes but the checkpoint names 2"):
        load_model(str(tmp_path / "bad.pt"))
    # an undecodable image is skipped with one line, the others are still drawn
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    Image.new("RGB", (64, 64)).save(tmp_path / "fine.png")
    written = sample.sample(load_model(str(tmp_path / "ckpt.pt"))[0],
                            [str(tmp_path / "broken.jpg"), str(tmp_path / "fine.png")], sample.out_dir)
    assert [p.rsplit("/", 1)[1] for p in written] == ["fine.png"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "broken.jpg" in err[0]


def test_json_boxes_are_the_drawn_ones_in_original_pixels(sample, tmp_path, capfd):
    model = fixed_box_model()
    torch.save({"model": model.state_dict(), "model_args": model.config, "classes": ["a", "b", "c"],
                "category_ids": [10, 20, 30], "config": {"dataset": "nowhere", "val_split": "val", "val_scale": 64,
                                                         "max_size": 200}}, tmp_path / "ckpt.pt")
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (96, 64)).save(folder / "a.png")  # batched with the next: padded, as in a real folder
    Image.new("RGB", (80, 50)).save(folder / "b.png")
    (folder / "c.jpg").write_bytes(b"no image")
    model = load_model(str(tmp_path / "ckpt.pt"))[0]
    paths = sample.image_paths(str(folder), None, model.classes)
    records = sample.write_json(model, paths, str(folder), str(tmp_path / "d.json"), None, model.category_ids)
    assert records == json.loads((tmp_path / "d.json").read_text())
    assert "skip: cannot decode" in capfd.readouterr().err  # logged by a loader worker
    by_file = {r["file_name"]: r for r in records}
    assert len(records) == 2 * 3 and set(by_file) == {"a.png", "b.png"}
    # the drawn rectangle (test above): x 24..72, y 24..40 of 96x64; the same box on 80x50
    assert by_file["a.png"]["bbox"] == pytest.approx([24, 24, 48, 16], abs=1e-3)
    assert by_file["b.png"]["bbox"] == pytest.approx([20, 18.75, 40, 12.5], abs=1e-3)
    assert {r["category_id"] for r in records} == {20} and {r["image_id"] for r in records} == {0, 1}
    assert len(sample.write_json(model, paths, str(folder), str(tmp_path / "e.json"), top_k=1)) == 2


def test_the_python_api_gives_what_json_writes(sample, tmp_path):
    """sample.detect(model, images, threshold): paths or PIL images (EXIF applied), run as the checkpoint's
    run evaluated (its val_scale, batch and padding); its detections are those that --json writes."""
    model = fixed_box_model()
    with torch.no_grad():  # a different box and score per query, so that the order and the threshold show
        model.query_embed.weight.normal_()
        model.box_head[-1].weight.normal_(std=0.5)
        model.class_head.weight.normal_(std=0.3)
    torch.save({"model": model.state_dict(), "model_args": model.config, "classes": ["a", "b", "c"],
                "config": {"val_scale": 64, "max_size": 200, "batch_size": 2, "pad_to": 32}}, tmp_path / "ckpt.pt")
    model = load_model(str(tmp_path / "ckpt.pt"))[0]
    assert model.eval_config == {"val_scale": 64, "max_size": 200, "batch_size": 2, "pad_to": 32, "dtype": "float32"}
    rng = np.random.default_rng(0)
    for name, size in (("a.png", (96, 64)), ("b.png", (80, 50)), ("c.png", (64, 70))):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(tmp_path / name)
    paths = [str(tmp_path / n) for n in ("a.png", "b.png", "c.png")]
    found = sample.detect(model, [paths[0], Image.open(paths[1]), paths[2]], threshold=0.3)
    assert len(found) == 3 and all(set(d) == {"boxes", "scores", "labels", "names"} for d in found)
    assert (all((d["scores"] > 0.3).all() and (d["scores"].diff() <= 0).all() for d in found)
            and sum(len(d["scores"]) for d in found) > 0)
    assert found[0]["names"] == [["a", "b", "c"][label] for label in found[0]["labels"].tolist()]
    records = sample.write_json(model, paths, str(tmp_path), str(tmp_path / "d.json"), threshold=0.3)
    for i, d in enumerate(found):
        mine = [r for r in records if r["image_id"] == i]
        assert [r["score"] for r in mine] == pytest.approx(d["scores"].tolist(), abs=1e-7)
        xywh = [[x0, y0, x1 - x0, y1 - y0] for x0, y0, x1, y1 in d["boxes"].tolist()]
        assert np.allclose([r["bbox"] for r in mine], xywh, atol=1e-2) and len(mine) == len(xywh)
    assert sample.detect(model, [str(tmp_path / "missing.jpg")])[0] is None


def test_json_of_a_prepared_split_has_the_datasets_own_ids(tmp_path):
    """sample.py --split=val --json: the image ids and category ids of the dataset's json (as a COCO export
    gave them), so that pycocotools scores the file against that export; a folder keeps the file order."""
    import subprocess
    import sys

    from conftest import ROOT

    data = tmp_path / "mine"
    data.mkdir()
    for name in ("b.png", "a.png"):
        Image.new("RGB", (96, 64)).save(data / name)
    split = {"classes": ["a", "b", "c"], "category_ids": [10, 20, 30],
             "images": [{"file": "b.png", "width": 96, "height": 64, "boxes": [], "labels": [], "id": 397133},
                        {"file": "a.png", "width": 96, "height": 64, "boxes": [], "labels": [], "id": 42}]}
    (data / "val.json").write_text(json.dumps(split))
    model = fixed_box_model()
    config = {"dataset": str(data), "val_split": "val", "val_scale": 64, "max_size": 200}
    torch.save({"model": model.state_dict(), "model_args": model.config, "classes": ["a", "b", "c"],
                "config": config}, tmp_path / "ckpt.pt")
    result = subprocess.run([sys.executable, "sample.py", f"--ckpt={tmp_path / 'ckpt.pt'}", "--split=val",
                             f"--json={tmp_path / 'd.json'}", "--top_k=1"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    records = json.loads((tmp_path / "d.json").read_text())
    assert {(r["file_name"], r["image_id"], r["category_id"]) for r in records} == {("b.png", 397133, 20),
                                                                                    ("a.png", 42, 20)}
    result = subprocess.run([sys.executable, "sample.py", f"--ckpt={tmp_path / 'ckpt.pt'}", f"--images={data}",
                             f"--json={tmp_path / 'e.json'}", "--top_k=1"], cwd=ROOT, capture_output=True, text=True)
    records = json.loads((tmp_path / "e.json").read_text())  # a folder: the index in sorted file order
    assert {(r["file_name"], r["image_id"]) for r in records} == {("a.png", 0), ("b.png", 1)}
    result = subprocess.run([sys.executable, "sample.py", "--ckpt=" + str(tmp_path / "ckpt.pt"), "--split=test",
                             f"--json={tmp_path / 'f.json'}"], cwd=ROOT, capture_output=True, text=True)
    assert (result.returncode == 1 and result.stderr.startswith("error: give --images=path, or --split=NAME")
            and "test.json" in result.stderr and "Traceback" not in result.stderr)


def test_json_by_default_is_what_cocos_evaluation_counts(tmp_path):
    """sample.py --json with no --threshold or --top_k writes every detection (up to max_dets per image and
    class), so pycocotools on the file gives tools/eval.py's mAP; a threshold drops the low scores AP counts."""
    import subprocess
    import sys

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from conftest import ROOT
    from sample import detect

    model = fixed_box_model(num_queries=10)
    with torch.no_grad():  # a different box, class and score per query, some of them near-certain
        model.class_head.bias.copy_(torch.tensor([0.0, 6.0, 0.0, 0.0]))
        model.query_embed.weight.normal_(generator=torch.Generator().manual_seed(1))
        model.box_head[-1].weight.normal_(std=0.5, generator=torch.Generator().manual_seed(2))
        model.class_head.weight.normal_(std=1.0, generator=torch.Generator().manual_seed(3))
    data = tmp_path / "mine"
    data.mkdir()
    rng = np.random.default_rng(0)
    sizes = [(96, 64), (80, 50), (64, 70), (100, 80), (72, 72), (90, 60)]
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(data / f"{i}.png")
    config = {"dataset": str(data), "val_split": "val", "val_scale": 64, "max_size": 200, "batch_size": 2, "pad_to": 32}
    torch.save({"model": model.state_dict(), "model_args": model.config, "classes": ["a", "b", "c"], "config": config},
               tmp_path / "ckpt.pt")
    # the ground truth: some of the model's own boxes, moved a few pixels, some with another class
    found = detect(load_model(str(tmp_path / "ckpt.pt"))[0], [str(data / f"{i}.png") for i in range(len(sizes))],
                   top_k=10)
    images, annotations = [], []
    for i, (d, (w, h)) in enumerate(zip(found, sizes)):
        boxes, labels = [], []
        for j in (1, 4, 9):  # a sure box, a wrong class, the least sure box
            x0, y0, x1, y1 = (d["boxes"][j] + torch.tensor(rng.uniform(-3, 3, 4))).clamp(min=0).tolist()
            if x1 - x0 > 2 and y1 - y0 > 2:
                boxes.append([x0, y0, min(x1, w), min(y1, h)])
                labels.append((d["labels"][j].item() + (j == 4)) % 3)
        images.append({"file": f"{i}.png", "width": w, "height": h, "boxes": boxes, "labels": labels, "id": 100 + i})
        annotations += [{"id": len(annotations) + k + 1, "image_id": 100 + i, "category_id": label + 1, "iscrowd": 0,
                         "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "area": (b[2] - b[0]) * (b[3] - b[1])}
                        for k, (b, label) in enumerate(zip(boxes, labels))]
    (data / "val.json").write_text(json.dumps({"classes": ["a", "b", "c"], "category_ids": [1, 2, 3],
                                               "images": images}))
    (tmp_path / "coco.json").write_text(json.dumps({
        "images": [{"id": r["id"], "file_name": r["file"], "width": r["width"], "height": r["height"]} for r in images],
        "annotations": annotations, "categories": [{"id": k + 1, "name": n} for k, n in enumerate("abc")]}))

    def pycocotools_map(flags):
        result = subprocess.run([sys.executable, "sample.py", f"--ckpt={tmp_path / 'ckpt.pt'}", "--split=val",
                                 f"--json={tmp_path / 'd.json'}", *flags], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
        coco = COCO(str(tmp_path / "coco.json"))
        evaluator = COCOeval(coco, coco.loadRes(str(tmp_path / "d.json")), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        return evaluator.stats[0], len(json.loads((tmp_path / "d.json").read_text()))

    result = subprocess.run([sys.executable, "tools/eval.py", f"--ckpt={tmp_path / 'ckpt.pt'}",
                             f"--out_dir={tmp_path / 'report'}", "--num_workers=0"], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    reported = json.loads((tmp_path / "report" / "summary.json").read_text())["mAP"]
    every, count = pycocotools_map([])
    assert count == 10 * len(sizes) and reported > 0.1
    assert every == pytest.approx(reported, abs=1e-4)
    above, count = pycocotools_map(["--threshold=0.997"])
    assert count < 10 * len(sizes) and above < reported - 0.01
