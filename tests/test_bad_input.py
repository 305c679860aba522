"""Every bad input a user can hand the scripts ends in exit code 1 and one `error:` line, never a
traceback: config values, dataset jsons, checkpoints, images, and the prepare scripts' flags."""

import json
import runpy
import subprocess
import sys

import pytest
import torch
from PIL import Image

import train
from conftest import ROOT
from detr import DETR

TINY_MODEL = dict(num_classes=2, backbone="resnet18", hidden_dim=32, num_heads=4, num_encoder_layers=1,
                  num_decoder_layers=1, dim_feedforward=64, num_queries=4)
TINY_RUN = ["--backbone=resnet18", "--pretrained_backbone=False", "--hidden_dim=32", "--num_heads=4",
            "--num_encoder_layers=1", "--num_decoder_layers=1", "--dim_feedforward=64", "--num_queries=4",
            "--num_workers=0", "--max_iters=2", "--device=cpu", "--dtype=float32"]


def image(i, boxes=((4, 4, 20, 20),), labels=(0,)):
    return {"file": f"{i}.png", "width": 32, "height": 32, "boxes": [list(b) for b in boxes], "labels": list(labels)}


def dataset(folder, train_json):
    """A folder with the given train.json (a dict, or raw text) and a good val.json."""
    folder.mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (32, 32), (200, 40 * i, 90)).save(folder / f"{i}.png")
    good = {"classes": ["a", "b"], "images": [image(0), image(1, labels=(1,))]}
    (folder / "val.json").write_text(json.dumps(good))
    (folder / "train.json").write_text(train_json if isinstance(train_json, str) else json.dumps(train_json))
    return str(folder)


def training_checkpoint(path, classes=("a", "b"), **model_changes):
    """A minidetr checkpoint as train.py writes it; model_changes make its weights another model's."""
    path.parent.mkdir(parents=True, exist_ok=True)
    model = DETR(**{**TINY_MODEL, **model_changes})
    torch.save({"model": model.state_dict(), "optimizer": {}, "model_args": DETR(**TINY_MODEL).config, "iter_num": 1,
                "best_val": 0.0, "config": train.get_config([]), "classes": list(classes),
                "rng": {"cpu": [torch.get_rng_state()], "cuda": []}}, path)
    return str(path)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """name -> command line (relative to the repository root) for every bad input."""
    t = tmp_path_factory.mktemp("bad")
    good = dataset(t / "good", {"classes": ["a", "b"], "images": [image(0), image(1, labels=(1,))]})
    (t / "garbage.pt").write_bytes(b"\x00not a checkpoint" * 100)
    real = training_checkpoint(t / "real" / "ckpt.pt")
    truncated = t / "truncated" / "ckpt.pt"
    truncated.parent.mkdir()
    truncated.write_bytes(open(real, "rb").read()[:5000])
    (t / "garbage" / "ckpt.pt").parent.mkdir()
    (t / "garbage" / "ckpt.pt").write_bytes((t / "garbage.pt").read_bytes())
    training_checkpoint(t / "other_model" / "ckpt.pt", hidden_dim=64)
    training_checkpoint(t / "other_classes" / "ckpt.pt", classes=("cat", "dog"))
    torch.save({"weights": torch.zeros(3)}, t / "not_detr.pt")
    (t / "unreadable").mkdir()
    (t / "unreadable" / "photo.jpg").write_bytes(b"this is no jpeg")
    (t / "notes.txt").write_text("hello")
    (t / "truncated.json").write_text('{"images": [{"id": 1, "file_name"')
    (t / "list.json").write_text("[1, 2, 3]")
    run = [sys.executable, "train.py", f"--dataset={good}", *TINY_RUN, f"--out_dir={t}/out"]
    sample = [sys.executable, "sample.py", f"--out_dir={t}/samples"]
    coco = [sys.executable, "data/coco/prepare.py"]
    evaluate = [sys.executable, "tools/eval.py", f"--out_dir={t}/report", "--num_workers=0"]
    analyses = [sys.executable, "tools/analyses.py", f"--out_dir={t}/samples"]
    (t / "undecodable").mkdir()
    (t / "undecodable" / "0.png").write_bytes(b"no png here")
    (t / "undecodable" / "val.json").write_text(json.dumps({"classes": ["a", "b"], "images": [image(0)]}))
    (t / "no_images").mkdir()
    (t / "no_images" / "val.json").write_text(json.dumps({"classes": ["a", "b"], "images": []}))
    return {
        # train.py: config values
        "batch_size 0": [*run, "--batch_size=0"],
        "negative learning rate": [*run, "--learning_rate=-1e-4"],
        "max_iters 0": [*run, "--max_iters=0"],
        "zero scale": [*run, "--train_scales=[0, 64]"],
        "crop range reversed": [*run, "--crop_size=(64, 32)"],
        "unknown backbone": [*run, "--backbone=resnet7"],
        "dropout above 1": [*run, "--dropout=1.5"],
        "heads do not divide width": [*run, "--num_heads=5"],
        "box additions without anchor queries": [*run, "--conditional_cross_attn=True"],
        "dilation with resnet18": [*run, "--dilation=True"],
        "unknown lr_schedule": [*run, "--lr_schedule=linear"],
        "min_lr_ratio above 1": [*run, "--lr_schedule=cosine", "--min_lr_ratio=2"],
        "ema_decay 1": [*run, "--ema_decay=1"],
        "unknown cls_loss": [*run, "--cls_loss=softmax"],
        "mosaic_prob above 1": [*run, "--mosaic_prob=1.5"],
        "dn_contrastive without denoising": [*run, "--denoising_groups=0", "--dn_contrastive=True"],
        "tensorboard not installed": [*run, "--tensorboard=True"],
        "train scale not a number": [*run, "--train_scales=[64, 'a']"],
        "wrong type": [*run, "--batch_size=two"],
        "unknown key": [*run, "--batch_sise=2"],
        "missing config file": [*run[:2], "config/nope.py"],
        "config file that fails": [*run[:2], str(t / "notes.txt")],
        "unknown dataset": [*run, f"--dataset={t}/nowhere"],
        # train.py: dataset jsons
        "truncated dataset json": [*run, "--dataset=" + dataset(t / "d1", '{"classes": ["a"], "ima')],
        "dataset json not a dict": [*run, "--dataset=" + dataset(t / "d2", "[1, 2]")],
        "label outside the classes": [*run, "--dataset=" + dataset(t / "d3", {"classes": ["a", "b"],
                                                                              "images": [image(0, labels=(2,))]})],
        "empty box": [*run, "--dataset=" + dataset(t / "d4", {"classes": ["a", "b"],
                                                              "images": [image(0, boxes=((9, 4, 9, 20),))]})],
        "box far outside": [*run, "--dataset=" + dataset(t / "d5", {"classes": ["a", "b"],
                                                                    "images": [image(0, boxes=((4, 4, 90, 20),))]})],
        "labels and boxes differ": [*run, "--dataset=" + dataset(t / "d6", {"classes": ["a", "b"],
                                                                            "images": [image(0, labels=(0, 1))]})],
        "other classes in train": [*run, "--dataset=" + dataset(t / "d7", {"classes": ["x", "y"],
                                                                           "images": [image(0)]})],
        # train.py: checkpoints
        "resume garbage": [*run, "--init_from=resume", f"--out_dir={t}/garbage"],
        "resume truncated": [*run, "--init_from=resume", f"--out_dir={truncated.parent}"],
        "resume another model": [*run, "--init_from=resume", f"--out_dir={t}/other_model"],
        "resume other classes": [*run, "--init_from=resume", f"--out_dir={t}/other_classes"],
        "resume with nothing there": [*run, "--init_from=resume", f"--out_dir={t}/empty"],
        "init_from missing file": [*run, f"--init_from={t}/nope.pth"],
        "init_from garbage": [*run, f"--init_from={t}/garbage.pt"],
        "init_from not a DETR": [*run, f"--init_from={t}/not_detr.pt"],
        "init_from another architecture": [*run, f"--init_from={real}", "--hidden_dim=64"],
        "init_from fewer layers": [*run, f"--init_from={real}", "--num_decoder_layers=2"],
        # sample.py
        "sample garbage checkpoint": [*sample, f"--ckpt={t}/garbage.pt", f"--images={t}/unreadable"],
        "sample truncated checkpoint": [*sample, f"--ckpt={truncated}", f"--images={t}/unreadable"],
        "sample nothing readable": [*sample, f"--ckpt={real}", f"--images={t}/unreadable", f"--out_dir={t}/s"],
        "sample no images there": [*sample, f"--ckpt={real}", f"--images={t}/none.jpg"],
        "sample bad threshold": [*sample, f"--ckpt={real}", "--threshold=high"],
        # prepare scripts
        "coco truncated json": [*coco, f"--ann={t}/truncated.json", f"--images={t}"],
        "coco json not COCO": [*coco, f"--ann={t}/list.json", f"--images={t}"],
        "coco missing json": [*coco, f"--ann={t}/nope.json", f"--images={t}"],
        "coco no flags": coco,
        "voc not a devkit": [sys.executable, "data/voc/prepare.py", f"--voc_root={t}"],
        "shapes bad count": [sys.executable, "data/shapes/prepare.py", "--num_train=many", f"--out_dir={t}/sh"],
        # sample.py --json and tools/export.py
        "json of nothing readable": [*sample, f"--ckpt={real}", f"--images={t}/unreadable", f"--json={t}/d.json"],
        "json into no folder": [*sample, f"--ckpt={real}", f"--images={t}/unreadable", f"--json={t}/no/d.json"],
        "export images too small": [sys.executable, "tools/export.py", f"--ckpt={real}", "--sizes=16x16",
                                    f"--out={t}/m.onnx"],
        "export not a DETR": [sys.executable, "tools/export.py", f"--ckpt={t}/not_detr.pt", f"--out={t}/m.onnx"],
        "export garbage": [sys.executable, "tools/export.py", f"--ckpt={t}/garbage.pt", f"--out={t}/m.onnx"],
        "bench unknown what": [sys.executable, "tools/bench.py", "--what=memroy"],
        # tools/eval.py and tools/analyses.py
        "eval garbage checkpoint": [*evaluate, f"--ckpt={t}/garbage.pt", f"--dataset={good}"],
        "eval no such split": [*evaluate, f"--ckpt={real}", f"--dataset={good}", "--split=test"],
        "eval bad threshold": [*evaluate, f"--ckpt={real}", "--threshold=1.5"],
        "eval bad dtype": [*evaluate, f"--ckpt={real}", "--dtype=fp8"],
        "eval classes share no name": [*evaluate, f"--ckpt={t}/other_classes/ckpt.pt", f"--dataset={good}"],
        "eval nothing decodable": [*evaluate, f"--ckpt={real}", f"--dataset={t}/undecodable"],
        "eval empty split": [*evaluate, f"--ckpt={real}", f"--dataset={t}/no_images"],
        "matching with images": [*analyses, f"--ckpt={real}", "--matching", f"--images={t}/unreadable"],
        "matching no such split": [*analyses, f"--ckpt={real}", "--matching", "--split=nope"],
        "analyses nothing to draw": [*analyses, f"--ckpt={real}"],
        "analyses no log file": [*analyses, f"--log={t}/nope.jsonl"],
        "eval no such device": [*evaluate, f"--ckpt={real}", f"--dataset={good}", "--device=tpu"],
        "eval out_dir a file": [*evaluate[:2], f"--out_dir={t}/notes.txt", f"--ckpt={real}", f"--dataset={good}"],
        "sample no such device": [*sample, f"--ckpt={real}", "--device=foo"],
        "sample out_dir a file": [*sample, f"--ckpt={real}", f"--out_dir={t}/notes.txt"],
    }


CASES = [
    "batch_size 0", "negative learning rate", "max_iters 0", "zero scale", "crop range reversed", "unknown backbone",
    "dropout above 1", "heads do not divide width", "box additions without anchor queries", "dilation with resnet18",
    "unknown lr_schedule", "min_lr_ratio above 1", "ema_decay 1", "unknown cls_loss", "mosaic_prob above 1",
    "dn_contrastive without denoising", "tensorboard not installed",
    "train scale not a number", "wrong type", "unknown key", "missing config file",
    "config file that fails", "unknown dataset", "truncated dataset json",
    "dataset json not a dict", "label outside the classes", "empty box", "box far outside", "labels and boxes differ",
    "other classes in train", "resume garbage", "resume truncated", "resume another model", "resume other classes",
    "resume with nothing there", "init_from missing file", "init_from garbage", "init_from not a DETR",
    "init_from another architecture", "init_from fewer layers",
    "sample garbage checkpoint", "sample truncated checkpoint", "sample nothing readable", "sample no images there",
    "sample bad threshold", "coco truncated json", "coco json not COCO", "coco missing json", "coco no flags",
    "voc not a devkit", "shapes bad count", "json of nothing readable", "json into no folder",
    "export images too small", "export not a DETR", "export garbage", "bench unknown what",
    "eval garbage checkpoint", "eval no such split", "eval bad threshold", "eval bad dtype",
    "eval classes share no name", "eval nothing decodable", "eval empty split", "matching with images",
    "matching no such split",
    "analyses nothing to draw", "analyses no log file",
    "eval no such device", "eval out_dir a file", "sample no such device", "sample out_dir a file",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_error_line(case, inputs, monkeypatch, capsys):
    """Each script runs as __main__ in this process (as `python script.py ...` would, minus the torch
    import): it must stop with SystemExit carrying one `error:` line, which Python prints to stderr
    with exit code 1; any other exception would be a traceback."""
    script, *args = inputs[case][1:]
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", [script, *args])
    before = sorted(p.name for p in ROOT.iterdir())
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    assert sorted(p.name for p in ROOT.iterdir()) == before  # nothing left in the repository
    message = stop.value.code
    assert isinstance(message, str), f"exit code {message!r}"  # a message means exit status 1
    output = capsys.readouterr()
    lines = [line for line in (output.out + output.err).splitlines() if line.strip() and not line.startswith("skip")]
    assert message.startswith("error: ") and "\n" not in message and lines == [], (message, lines)


def test_a_bad_input_exits_1_with_one_line_and_no_traceback(inputs):
    result = subprocess.run(inputs["batch_size 0"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == "error: batch_size=0 must be >= 1\n"


def test_a_run_that_fails_before_its_first_step_leaves_no_out_dir(inputs, tmp_path):
    """No dataset there: the out_dir the run made for itself goes again; one that was there stays."""
    for out_dir, there in ((tmp_path / "new", False), (tmp_path / "kept", True)):
        if there:
            out_dir.mkdir()
        argv = [*inputs["unknown dataset"], f"--out_dir={out_dir}"]
        result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert result.returncode == 1 and result.stderr.startswith("error: ") and out_dir.is_dir() == there


def test_every_case_is_listed(inputs):
    assert sorted(CASES) == sorted(inputs) and len(CASES) >= 20
