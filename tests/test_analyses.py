"""tools/analyses.py: the training curves, weight histograms, matching and query-slot pictures are drawn."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from additions.model import AdditionsDETR
from conftest import ROOT, load_script
from lib.weights import load_model
from test_sample import fixed_box_model, save_checkpoint


@pytest.fixture
def analyses(tmp_path):
    pytest.importorskip("matplotlib")
    module = load_script("tools/analyses.py")
    module.out_dir = str(tmp_path / "samples")
    return module


def test_curves_png_from_a_hand_made_log(analyses, tmp_path):
    records = [{"iter": i, "loss": 10 / i, "loss_ce": 1 / i, "loss_bbox": 0.5 / i, "loss_giou": 0.7 / i, "lr": 1e-4}
               for i in range(1, 30)] + [{"iter": 29, "val_mAP50": 0.5, "val_mAP50_07": 0.48, "val_mAP": 0.3}]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    path = analyses.plot_log(str(tmp_path / "log.jsonl"), str(tmp_path / "curves.png"))
    image = np.asarray(Image.open(path).convert("RGB"))
    assert image.shape[0] > 300 and image.shape[1] > 600 and image.std() > 10  # a drawn figure, not blank
    # the diagnostics panels (the bottom row's first three: classes, box spread, IoU by layer) are empty without
    # diagnostics, and drawn with them
    bottom = image[2 * image.shape[0] // 3 :]
    for r in records[:-1]:
        r.update(grad_norm_backbone=1 / r["iter"], grad_norm_class_head=2.0, weight_norm_backbone=50 + r["iter"],
                 weight_norm_class_head=3.0, query_classes=1 + r["iter"] % 3, query_box_spread=0.01 * r["iter"],
                 iou_start=0.3, iou_layer_0=0.4 + 0.01 * r["iter"], iou_dn_start=0.5, iou_dn_layer_0=0.6)
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    drawn = analyses.plot_log(str(tmp_path / "log.jsonl"), str(tmp_path / "curves.png"))
    drawn = np.asarray(Image.open(drawn).convert("RGB"))
    changed = (drawn[2 * drawn.shape[0] // 3 :] != bottom).any(-1)  # (rows, columns) of pixels that differ
    quarters = np.array_split(changed, 4, axis=1)
    assert all(q.mean() > 0.01 for q in quarters[:3]) and quarters[3].mean() == 0  # the three drawn, the empty slot not
    keys = ["iou_dn_layer_0", "iou_layer_1", "iou_dn_start", "iou_layer_0", "iou_start"]
    assert sorted(keys, key=analyses.iou_order) == ["iou_start", "iou_layer_0", "iou_layer_1", "iou_dn_start",
                                                    "iou_dn_layer_0"]


def test_weight_histograms_one_panel_per_part(analyses, tmp_path, capsys):
    model = AdditionsDETR(num_classes=3, backbone="resnet18", hidden_dim=32, num_heads=4, num_encoder_layers=1,
                          num_decoder_layers=1, dim_feedforward=64, num_queries=3, anchor_queries=True)
    save_checkpoint(model, tmp_path / "ckpt.pt", ["a", "b", "c"])
    path = analyses.plot_weights(load_model(str(tmp_path / "ckpt.pt"))[0], str(tmp_path / "weights.png"))
    assert capsys.readouterr().out.startswith("8 parts")  # the paper's 7 and the anchors
    image = np.asarray(Image.open(path).convert("RGB"))
    assert image.shape[1] > 600 and image.std() > 10


def test_matching_picture_shows_the_losss_own_matching(analyses, tmp_path, capsys):
    """--matching draws the training matcher's choice, and its three cost terms add up to its cost."""
    import train

    torch.manual_seed(0)
    outputs = {"pred_logits": torch.randn(2, 5, 4), "pred_boxes": torch.rand(2, 5, 4) * 0.5 + 0.25}
    targets = [{"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.2]])},
               {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.6, 0.4, 0.3, 0.3]])}]
    matcher = train.HungarianMatcher(1.0, 5.0, 2.0)
    parts = matcher.cost(outputs, targets, parts=True)
    assert torch.equal(parts[0] + parts[1] + parts[2], matcher.cost(outputs, targets))
    assert torch.equal(parts[0], -outputs["pred_logits"].softmax(-1)[None][..., torch.tensor([0, 2, 1])])
    # from a checkpoint whose config names its dataset: one picture per image of the val split
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (96, 64), (40, 40, 40)).save(data / "0.png")
    record = {"file": "0.png", "width": 96, "height": 64, "boxes": [[20, 20, 50, 40], [60, 10, 90, 30]],
              "labels": [1, 2]}
    (data / "broken.png").write_bytes(b"not a png")  # a logged skip, and the next image is not drawn in its place
    broken = {**record, "file": "broken.png"}
    (data / "val.json").write_text(json.dumps({"classes": ["a", "b", "c"], "images": [broken, record]}))
    config = {"dataset": str(data), "val_split": "val", "val_scale": 64, "max_size": 200, "cost_class": 1.0,
              "cost_bbox": 5.0, "cost_giou": 2.0}
    model = fixed_box_model()
    torch.save({"model": model.state_dict(), "model_args": model.config, "classes": ["a", "b", "c"], "config": config},
               tmp_path / "ckpt.pt")
    analyses.ckpt, analyses.matching = str(tmp_path / "ckpt.pt"), True
    analyses.main()
    output = capsys.readouterr()
    assert "2 matched queries of 3" in output.out and "skip: cannot decode" in output.err
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["0_matching.png"]
    picture = Image.open(tmp_path / "samples" / "0_matching.png")
    assert min(picture.size) >= 512 and np.asarray(picture.convert("RGB")).std() > 10


def test_slots_draw_every_box_of_each_query_slot(analyses, tmp_path):
    """--slots (the paper's Fig. 7): one panel per slot, every prediction whatever its score; more slots than
    the model has queries is one error line, and so is naming no analysis."""
    save_checkpoint(fixed_box_model(num_queries=3), tmp_path / "ckpt.pt", ["a", "b", "c"])
    (tmp_path / "imgs").mkdir()
    for i in range(4):
        Image.new("RGB", (96, 64), (40 * i, 90, 120)).save(tmp_path / "imgs" / f"{i}.png")
    model = load_model(str(tmp_path / "ckpt.pt"))[0]
    paths = sorted(str(p) for p in (tmp_path / "imgs").iterdir())
    path = analyses.draw_slots(model, paths, 3, str(tmp_path / "slots.png"))
    picture = np.asarray(Image.open(path).convert("RGB"))
    assert min(picture.shape[:2]) >= 512
    red = (picture[..., 0] > 180) & (picture[..., 1] < 80) & (picture[..., 2] < 80)  # every box is wide: (0.5, 0.25)
    assert red.sum() > 30
    run = [sys.executable, "tools/analyses.py", f"--ckpt={tmp_path / 'ckpt.pt'}", f"--out_dir={tmp_path / 'out'}"]
    for flags, message in ([[f"--images={tmp_path / 'imgs'}", "--slots", "--num_slots=5"],
                            "error: --num_slots=5 but the model has 3 query slots"],
                           [[], "error: give one of --log=PATH, --weights, --matching or --slots"]):
        result = subprocess.run([*run, *flags], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 1 and result.stderr.strip() == message
