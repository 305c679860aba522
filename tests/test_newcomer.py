"""A newcomer's first hour: fine-tuning needs no config archaeology and says what it did, the messages say
what they mean (a mistyped flag, the end of a run, the detections limit, the two AP50s, skip lines, a
photo labelled on its raw frame), and the official models run at the batch they were trained with."""

import json
import sys

import pytest
import torch
from PIL import Image

import lib.run
import train
from lib import weights
from conftest import load_script
from data import pipeline
from detr import DETR
from test_train import make_shapes, run
from lib.weights import COCO_CLASSES
from additions.model import AdditionsDETR

VOC_CLASSES = load_script("data/voc/prepare.py").CLASSES


def test_fine_tuning_a_minidetr_checkpoint_takes_its_architecture(tmp_path, capsys):
    """--init_from=best.pt with a config that does not say the architecture (config/custom.py): the
    checkpoint's for every model key no config file or flag sets; a flag still wins."""
    make_shapes(tmp_path / "data", 4, 2)
    run(tmp_path / "mine", tmp_path / "data", max_iters=1, num_queries=6, frozen_bn=False, lr_backbone=0.0)  # frozen
    (tmp_path / "custom.py").write_text("learning_rate = 1e-4\nbatch_size = 2\n")
    capsys.readouterr()
    config = train.get_config([str(tmp_path / "custom.py"), f"--init_from={tmp_path / 'mine' / 'best.pt'}",
                               "--dropout=0.2"])
    assert ((config["backbone"], config["hidden_dim"], config["num_queries"], config["frozen_bn"])
            == ("resnet18", 32, 6, False))
    assert config["dropout"] == 0.2 and config["learning_rate"] == 1e-4  # set by the flag and the file
    assert config["trainable_layers"] == 3  # how the source run trained (lr_backbone=0: none) is not architecture
    out = capsys.readouterr().out
    assert "its architecture, which no config file or flag sets: " in out and "backbone='resnet18'" in out
    assert "dropout" not in out
    assert train.get_config([])["backbone"] == "resnet50"  # from scratch: the defaults


def test_fine_tuning_says_what_it_loaded_made_new_and_left_out(tmp_path, capsys):
    """The official COCO model on VOC: its six classes under VOC's names (aeroplane is COCO's airplane ...)
    keep their rows, so all 20 do; the class line names the COCO classes dropped (ten, and a count)."""
    official = DETR(num_classes=91, backbone="resnet18", hidden_dim=32, num_heads=8, num_encoder_layers=1,
                    num_decoder_layers=2, dim_feedforward=64, num_queries=8)
    official.classes = COCO_CLASSES
    model = AdditionsDETR(num_classes=20, backbone="resnet18", hidden_dim=32, num_heads=8, num_encoder_layers=1,
                          num_decoder_layers=2, dim_feedforward=64, num_queries=8, anchor_queries=True)
    model.classes = VOC_CLASSES
    done = weights.transfer_weights(official, model, "detr-r50")
    assert done["new_classes"] == [] and len(done["dropped_classes"]) == 60 and "box_head" in done["new"]
    rows = [COCO_CLASSES.index(c) for c in ("airplane", "dining table", "motorcycle", "potted plant", "couch", "tv")]
    ours = [VOC_CLASSES.index(c) for c in ("aeroplane", "diningtable", "motorbike", "pottedplant", "sofa", "tvmonitor")]
    assert torch.equal(model.class_head.weight[ours], official.class_head.weight[rows])
    assert weights.few([str(i) for i in range(12)]) == "0, 1, 2, 3, 4, 5, 6, 7, 8, 9 and 2 more"
    # and the three lines of a run
    make_shapes(tmp_path / "data", 4, 2)
    small = dict(backbone="resnet18", hidden_dim=32, num_heads=4, num_encoder_layers=1, num_decoder_layers=2,
                 dim_feedforward=64, num_queries=8)
    source = AdditionsDETR(num_classes=3, **small, anchor_queries=True, denoising_groups=2)
    source.classes = ["circle", "square", "hexagon"]
    torch.save({"model": source.state_dict(), "model_args": source.config, "classes": source.classes, "config": {}},
               tmp_path / "source.pt")
    run(tmp_path / "out", tmp_path / "data", max_iters=1, init_from=str(tmp_path / "source.pt"), anchor_queries=True)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("init_from=")]
    assert len(lines) == 3
    assert lines[0].endswith("loaded backbone, input_proj, encoder, decoder, query_embed, class_head, box_head, "
                             "anchors; the class rows of 2 of the 4 classes (by name)")
    assert lines[1].endswith("new class_head; rows for triangle, star")
    assert lines[2].endswith("left out denoising; dropped the class rows of hexagon (not in this data)")


def test_official_models_run_at_the_batch_they_were_trained_with(tmp_path):
    """The official README: 2 images a GPU (DC5: 1); evaluated otherwise they lose AP, so tools/eval.py and
    sample.py run them so, unless --batch_size says otherwise."""
    for dilation, batch in ((False, 2), (True, 1)):
        model = DETR(num_classes=91, backbone="resnet50", hidden_dim=32, num_heads=8, num_encoder_layers=1,
                     num_decoder_layers=1, dim_feedforward=64, num_queries=4, dilation=dilation)
        torch.save({"model": {weights.minidetr_to_official_key(k): v for k, v in model.state_dict().items()}},
                   tmp_path / "official.pth")
        loaded = weights.load_model(str(tmp_path / "official.pth"), dilation=dilation)[0]
        assert loaded.eval_config == {"val_scale": 800, "max_size": 1333, "batch_size": batch, "pad_to": 1,
                                      "dtype": "float32"}


def test_a_run_ends_with_a_summary_and_prints_the_detections_limit_only_where_it_binds(tmp_path, capsys):
    make_shapes(tmp_path / "data", 4, 2)
    run(tmp_path / "out", tmp_path / "data", max_iters=2, eval_interval=1)
    out = capsys.readouterr().out
    best = tmp_path / "out" / "best.pt"
    assert ("done: best val mAP50 " in out
            and f"at iteration {torch.load(best, weights_only=False)['best_iter']}, in {best}" in out)
    assert f"python sample.py --ckpt={best}" in out and f"python tools/eval.py --ckpt={best}" in out
    assert "detections an image and class" not in out  # 8 queries, max_dets 100: no limit binds
    run(tmp_path / "few", tmp_path / "data", max_iters=1, max_dets=4)
    assert "(at most 4 detections an image and class)" in capsys.readouterr().out


def test_a_skip_line_starts_a_line_of_its_own(tmp_path, capfd):
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    sys.stderr.write(" 40%|####      | 4/10 [00:01<00:01]")  # a progress bar's line, as tqdm leaves it
    assert pipeline.read_image(str(tmp_path / "broken.jpg")) is None
    err = capfd.readouterr().err
    assert "\nskip: cannot decode " in err and err.rstrip().splitlines()[-1].startswith("skip: cannot decode")


@pytest.mark.parametrize("source", ["voc", "coco"])
def test_a_photo_labelled_on_its_raw_frame_is_one_warning_line(tmp_path, source):
    """labelImg ignores EXIF: a portrait phone photo (stored landscape, turned by its EXIF tag) gets the raw
    80x48 in its xml or json, and boxes on the raw frame. One warning line names the file."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (80, 48)).save(tmp_path / "phone.jpg", exif=exif)
    lines = []
    if source == "voc":
        (tmp_path / "phone.xml").write_text("<annotation><size><width>80</width><height>48</height></size>"
                                            "<object><name>cat</name><bndbox><xmin>5</xmin><ymin>5</ymin>"
                                            "<xmax>30</xmax><ymax>30</ymax></bndbox></object></annotation>")
        load_script("data/voc/prepare.py").parse_annotation(str(tmp_path / "phone.xml"), str(tmp_path / "phone.jpg"),
                                                            lines.append)
    else:
        coco = {"images": [{"id": 1, "file_name": "phone.jpg", "width": 80, "height": 48}], "annotations": [],
                "categories": [{"id": 1, "name": "cat"}]}
        (tmp_path / "ann.json").write_text(json.dumps(coco))
        with pytest.raises(SystemExit):  # its only image skipped
            load_script("data/coco/prepare.py").prepare(str(tmp_path / "ann.json"), str(tmp_path), str(tmp_path / "d"),
                                                        "val", lines.append)
    warnings = [line for line in lines if line.startswith("warning: ")]
    assert len(warnings) == 1 and "phone.jpg" in warnings[0] and "raw frame" in warnings[0] and "48x80" in warnings[0]


def test_eval_tells_its_two_ap50s_apart(tmp_path, capsys):
    from test_eval import fixed_box_model, three_images

    evaluation = load_script("tools/eval.py")
    data = three_images(tmp_path / "data")
    model = fixed_box_model(["a", "b", "c"])
    evaluation.report(model, data, evaluation.predict(model, data, "cpu", batch_size=2), str(tmp_path / "report"), 0.5)
    text = capsys.readouterr().out
    assert "VOC's mAP50" in text and "all-point" in text and "the table's AP50 is COCO's 101-point" in text
    assert "detections an image and class" not in text


def test_a_run_on_the_plateau_says_so_once(tmp_path, capsys, monkeypatch):
    """metrics.plateau_warning, calibrated on vanilla DETR's shapes run (at step 800 every query gives one box,
    0.000 image widths from image to image, and one class) against the README's run (at least 0.25 and
    1.5 classes after the warm-up); a run prints it once."""
    from lib import metrics

    readme_run = {"iter": 400, "query_box_spread": 0.247, "query_box_image_std": 0.34, "query_classes": 1.62}
    vanilla = {"iter": 800, "query_box_spread": 0.0, "query_box_image_std": 0.0, "query_classes": 1.0}
    assert metrics.plateau_warning(readme_run, 100) is None
    line = metrics.plateau_warning(vanilla, 100)
    assert line.startswith("warning: iteration 800: DETR's early plateau: every query gives nearly the same box "
                           "whatever")
    assert "--init_from" in line and "\n" not in line
    assert metrics.plateau_warning({**vanilla, "query_box_image_std": 0.3}, 100).count("same class") == 1
    assert metrics.plateau_warning(vanilla, 800) is None  # still in the warm-up
    assert metrics.plateau_warning({**vanilla, "query_box_image_std": float("nan"), "query_classes": 3.0}, 100) is None
    make_shapes(tmp_path / "data", 4, 2)
    monkeypatch.setattr(lib.run, "plateau_warning", lambda record, warmup: "warning: the plateau")
    run(tmp_path / "out", tmp_path / "data", max_iters=4, log_interval=1, warmup_iters=0)
    assert capsys.readouterr().out.count("warning: the plateau") == 1


def test_the_readmes_python_snippet_runs_as_pasted(tmp_path):
    """The README's Python block, run as it stands from a repository root that holds a shapes model and
    the shapes val images: it prints each detection."""
    import re
    import subprocess

    from conftest import ROOT
    from test_sample import fixed_box_model, save_checkpoint

    snippet = re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    (tmp_path / "out-shapes").mkdir()
    save_checkpoint(fixed_box_model(), tmp_path / "out-shapes" / "best.pt", ["circle", "square", "triangle"])
    (tmp_path / "data" / "shapes" / "images" / "val").mkdir(parents=True)
    Image.new("RGB", (128, 128), (90, 60, 30)).save(tmp_path / "data" / "shapes" / "images" / "val" / "000000.jpg")
    result = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()  # the model's 3 queries all say "square" at the image's centre
    assert len(lines) == 3 and all(line == "square 1.00 at [32, 48, 96, 80]" for line in lines), lines


def test_a_resume_before_any_evaluation_says_so(tmp_path, capsys):
    """A checkpoint written before the first evaluation (a signal, checkpoint_minutes) has no best value yet."""
    import math

    make_shapes(tmp_path / "data", 4, 2)
    run(tmp_path / "out", tmp_path / "data", max_iters=2)
    checkpoint = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=False)
    torch.save({**checkpoint, "best_val": -math.inf, "best_iter": 0}, tmp_path / "out" / "ckpt.pt")
    capsys.readouterr()
    run(tmp_path / "out", tmp_path / "data", max_iters=3, init_from="resume")
    out = capsys.readouterr().out
    assert "init_from=resume: " in out and " at iteration 2, no evaluation yet" in out and "-inf" not in out


def test_a_cpu_run_takes_a_thread_per_free_core(monkeypatch, capsys):
    """Beside a busy process a 2-core CPU run takes 1 thread (and says so), on free cores torch's default;
    OMP_NUM_THREADS decides when set. busy_cores sees a real busy process."""
    import subprocess

    from lib import processes

    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        assert processes.busy_cores(0.5) >= 0.7
    finally:
        busy.kill()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(processes.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(processes.torch, "get_num_threads", lambda: 2)
    for others, threads in ((0.1, 2), (0.4, 2), (0.6, 1), (1.0, 1), (1.9, 1)):
        monkeypatch.setattr(processes, "busy_cores", lambda: others)
        assert processes.cpu_threads() == threads
    assert ("cpu: other work keeps 1.0 of the 2 cores busy: 1 thread (OMP_NUM_THREADS=N chooses)\n"
            in capsys.readouterr().out)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert processes.cpu_threads() == 2


def test_a_run_keeps_its_threads_in_its_checkpoint_and_a_resume_takes_them(tmp_path, monkeypatch):
    from lib import processes

    make_shapes(tmp_path / "data", 4, 2)
    monkeypatch.delenv("OMP_NUM_THREADS")
    threads = torch.get_num_threads()
    try:
        monkeypatch.setattr(processes, "busy_cores", lambda: len(processes.os.sched_getaffinity(0)))  # every core busy
        run(tmp_path / "out", tmp_path / "data", max_iters=2)
        assert torch.load(tmp_path / "out" / "ckpt.pt", weights_only=False)["cpu_threads"] == 1
        monkeypatch.setattr(processes, "busy_cores", lambda: 0.0)  # free now: the resume still takes the run's one
        run(tmp_path / "out", tmp_path / "data", max_iters=3, init_from="resume")
        assert torch.get_num_threads() == 1
        assert torch.load(tmp_path / "out" / "ckpt.pt", weights_only=False)["cpu_threads"] == 1
    finally:
        torch.set_num_threads(threads)
