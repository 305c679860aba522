"""Training and fine-tuning as DETR's successors do it: float16 with a loss scaler, fine-tuning from any
checkpoint (a minidetr one, with or without additions), an EMA of the weights, a cosine schedule,
TensorBoard. Each on a tiny model for a few CPU steps."""

import json
import math
import sys
import types
from functools import partial

import pytest
import torch

import train
from lib.run import ema_update
from lib import weights
from detr import DETR
from lib.inference import predict
from test_train import TINY, make_shapes, run
from additions.model import AdditionsDETR

WITH_ADDITIONS = dict(feature_stride=8, anchor_queries=True, encoder_proposals=True, denoising_groups=2, query_groups=2,
                      conditional_cross_attn=True)


def log_of(folder):
    return [json.loads(line) for line in open(folder / "log.jsonl")]


def same_metrics(metrics, record):
    """train()'s metrics equal a log record's val_* values, NaN (a class or size with no object) included."""
    val = {k: v for k, v in record.items() if k.startswith("val_")}
    return json.dumps({f"val_{k}": v for k, v in metrics.items()}, sort_keys=True) == json.dumps(val, sort_keys=True)


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_float16_trains_with_a_loss_scaler_and_resumes_exactly(tmp_path):
    """dtype=float16 scales the loss (torch.amp.GradScaler), its state is in ckpt.pt, and a run stopped at
    step 3 and resumed ends bit for bit where the run straight to 6 does; skipped steps are logged."""
    make_shapes(tmp_path / "data", 4, 2)
    common = dict(dtype="float16", lr_drop=100)
    run(tmp_path / "full", tmp_path / "data", max_iters=6, **common)
    run(tmp_path / "split", tmp_path / "data", max_iters=3, **common)
    run(tmp_path / "split", tmp_path / "data", max_iters=6, init_from="resume", **common)
    full, split = (torch.load(tmp_path / d / "ckpt.pt", weights_only=False) for d in ("full", "split"))
    assert same_state(full["model"], split["model"]) and full["scaler"] == split["scaler"]
    assert full["scaler"]["scale"] > 0 and all("skipped_steps" in r for r in log_of(tmp_path / "full") if "loss" in r)


def test_the_scaler_skips_a_step_whose_gradients_overflow(tmp_path, monkeypatch):
    """A scale far above float16's range makes every gradient overflow: each step is skipped (the weights stay
    as they were), counted in the log, and the scale halves each time, as GradScaler does."""
    make_shapes(tmp_path / "data", 4, 2)
    monkeypatch.setattr(torch.amp, "GradScaler", partial(torch.amp.GradScaler, init_scale=2.0**60))
    model, _ = run(tmp_path / "out", tmp_path / "data", max_iters=3, log_interval=3, dtype="float16", warmup_iters=0)
    assert log_of(tmp_path / "out")[0]["skipped_steps"] == 3
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=False)
    assert ckpt["scaler"]["scale"] == 2.0**57  # halved at each of the 3 steps
    assert all(state["step"] == 0 for state in ckpt["optimizer"]["state"].values())  # AdamW never stepped
    config = {**train.get_config([]), **TINY}
    torch.manual_seed(config["seed"])  # the run's own initial weights, as train() draws them
    fresh = weights.new_model(types.SimpleNamespace(**config), 4, config["trainable_layers"])
    assert same_state(model.state_dict(), fresh.state_dict())
    run(tmp_path / "f32", tmp_path / "data", max_iters=3, log_interval=3)
    assert "skipped_steps" not in log_of(tmp_path / "f32")[0]  # float32 has no scaler


def test_fine_tuning_from_a_minidetr_checkpoint_evaluates_as_its_source(tmp_path, capsys):
    """--init_from=best.pt of a run with additions: every tensor loads, so --eval_only gives exactly the
    source's last val metrics; with the classes listed in another order, the same AP for each class."""
    make_shapes(tmp_path / "data", 4, 3)
    config = dict(WITH_ADDITIONS, max_iters=3, eval_interval=3)
    run(tmp_path / "source", tmp_path / "data", **config)
    source_metrics = [r for r in log_of(tmp_path / "source") if "val_mAP" in r][-1]
    tuned, metrics = run(tmp_path / "tuned", tmp_path / "data", init_from=str(tmp_path / "source" / "best.pt"),
                         eval_only=True, **config)
    assert same_metrics(metrics, source_metrics)
    out = capsys.readouterr().out
    assert "loaded backbone, input_proj, encoder, decoder, query_embed, class_head, box_head, anchors, proposals, " \
           "denoising, conditional; the class rows of 4 of the 4 classes (by name)" in out
    assert "new nothing\n" in out and "left out no module\n" in out
    # the same data with its classes in another order: each class's AP is unchanged
    reordered = tmp_path / "reordered"
    reordered.mkdir()
    for split in ("train", "val"):
        data = json.loads((tmp_path / "data" / f"{split}.json").read_text())
        order = data["classes"][::-1]
        for image in data["images"]:
            image["labels"] = [order.index(data["classes"][label]) for label in image["labels"]]
            image["file"] = str(tmp_path / "data" / image["file"])
        (reordered / f"{split}.json").write_text(json.dumps({**data, "classes": order}))
    tuned_again, again = run(tmp_path / "again", reordered, init_from=str(tmp_path / "source" / "best.pt"),
                             eval_only=True, **config)
    names = json.loads((tmp_path / "data" / "val.json").read_text())["classes"]
    by_name, again_by_name = dict(zip(names, metrics["AP_per_class"])), dict(zip(names[::-1], again["AP_per_class"]))
    assert by_name.keys() == again_by_name.keys()
    assert all(by_name[c] == again_by_name[c] or (math.isnan(by_name[c]) and math.isnan(again_by_name[c]))
               for c in names)
    # the detections themselves, class by class name (after 3 steps the APs are near 0: this is the strong check)
    cfg = types.SimpleNamespace(**{**train.get_config([]), **TINY, **config, "dataset": str(tmp_path / "data")})
    val_set = train.load_datasets(cfg)[1]
    a, b = (predict(model, val_set, "cpu", cfg.batch_size, cfg.pad_to) for model in (tuned, tuned_again))
    assert a.keys() == b.keys() and len(a) > 0
    for i in a:
        assert [names[label] for label in a[i]["labels"]] == [names[::-1][label] for label in b[i]["labels"]]
        assert (torch.allclose(a[i]["scores"], b[i]["scores"], atol=1e-6)
                and torch.allclose(a[i]["boxes"], b[i]["boxes"], atol=1e-4))


def test_pretrained_weights_start_a_model_with_additions(tmp_path):
    """From a model without additions (an official or transformers DETR, or such a minidetr run): the
    backbone, projection, encoder, decoder and heads load; the additions' own modules start new, and so
    do the object queries (DETR's are positions, DAB-DETR's are content); class rows go by name, and a
    new class keeps its fresh rows."""
    torch.manual_seed(0)
    small = dict(backbone="resnet18", hidden_dim=32, num_heads=4, num_encoder_layers=1, num_decoder_layers=2,
                 dim_feedforward=64, num_queries=8)
    pretrained = DETR(3, **small)
    pretrained.classes = ["circle", "square", "star"]
    model = AdditionsDETR(3, **small, anchor_queries=True, encoder_proposals=True, denoising_groups=2,
                          conditional_cross_attn=True)
    model.classes = ["star", "circle", "hexagon"]
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    done = weights.transfer_weights(pretrained, model, "vanilla")
    assert done["loaded"] == ["backbone", "input_proj", "encoder", "decoder", "class_head"]
    # the box head too is new: DETR's gives an absolute box, DAB-DETR's an offset of the anchor box
    assert done["new"] == ["query_embed", "class_head", "box_head", "anchors", "proposals", "denoising", "conditional"]
    assert done["new_classes"] == ["hexagon"] and done["dropped_classes"] == ["square"] and done["left_out"] == []
    theirs, ours = pretrained.state_dict(), model.state_dict()
    assert torch.equal(ours["encoder.0.linear1.weight"], theirs["encoder.0.linear1.weight"])
    assert torch.equal(ours["decoder.1.cross_attn.in_proj_weight"], theirs["decoder.1.cross_attn.in_proj_weight"])
    assert torch.equal(ours["query_embed.weight"], fresh["query_embed.weight"])
    rows = ours["class_head.weight"]
    assert torch.equal(rows[0], theirs["class_head.weight"][2]) and torch.equal(rows[1], theirs["class_head.weight"][0])
    assert torch.equal(rows[2], fresh["class_head.weight"][2]) and torch.equal(rows[3], theirs["class_head.weight"][3])
    assert torch.equal(ours["label_embed.weight"], fresh["label_embed.weight"])  # the pretrained model has none
    # and back: a model with additions into one without, the additions' modules left out
    plain = DETR(3, **small)
    plain.classes = model.classes
    done = weights.transfer_weights(model, plain, "with additions")
    assert "anchors" not in done["loaded"] and done["new"] == ["query_embed", "box_head"]
    assert done["left_out"] == ["anchors", "proposals", "denoising", "conditional"]
    with pytest.raises(weights.LoadError, match="hidden_dim=32, the config has hidden_dim=64"):
        weights.transfer_weights(pretrained, DETR(3, **{**small, "hidden_dim": 64}), "vanilla")


def test_ema_is_evaluated_saved_and_resumed_exactly(tmp_path):
    """ema_decay: the averaged weights are what evaluation and best.pt use (a model loaded from best.pt
    evaluates to the logged metrics), ckpt.pt holds both, and a resumed run ends bit for bit as a straight
    one, with the cosine schedule too."""
    make_shapes(tmp_path / "data", 4, 3)
    config = dict(ema_decay=0.9, ema_warmup_iters=2, lr_schedule="cosine", min_lr_ratio=0.1, eval_interval=3)
    run(tmp_path / "full", tmp_path / "data", max_iters=6, **config)
    run(tmp_path / "split", tmp_path / "data", max_iters=3, **config)
    run(tmp_path / "split", tmp_path / "data", max_iters=6, init_from="resume", **config)
    full, split = (torch.load(tmp_path / d / "ckpt.pt", weights_only=False) for d in ("full", "split"))
    assert same_state(full["model"], split["model"]) and same_state(full["ema_model"], split["ema_model"])
    assert not same_state(full["model"], full["ema_model"])
    loaded, _ = weights.load_model(str(tmp_path / "full" / "ckpt.pt"))
    assert same_state(loaded.state_dict(), full["ema_model"])
    logged = [r for r in log_of(tmp_path / "full") if "val_mAP" in r][-1]
    _, metrics = run(tmp_path / "eval", tmp_path / "data", max_iters=6, init_from=str(tmp_path / "full" / "ckpt.pt"),
                     eval_only=True)
    assert same_metrics(metrics, logged)


def test_ema_update_and_its_warm_up():
    """ema = d * ema + (1 - d) * weights, with d = ema_decay * (1 - exp(-step / ema_warmup_iters)); integer
    buffers copied."""
    model = torch.nn.BatchNorm1d(3)
    ema = torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        model.weight.fill_(2.0)
        model.num_batches_tracked.fill_(7)
    ema_update(ema, model, 0.25)
    assert torch.allclose(ema.weight, torch.full((3,), 0.25 * 1 + 0.75 * 2)) and ema.num_batches_tracked == 7


def test_cosine_schedule():
    cfg = types.SimpleNamespace(warmup_iters=10, max_iters=110, lr_schedule="cosine", min_lr_ratio=0.1, lr_drop=50)
    assert train.lr_factor(4, cfg) == 0.5 and train.lr_factor(10, cfg) == 1.0
    assert train.lr_factor(60, cfg) == pytest.approx(0.55) and train.lr_factor(110, cfg) == pytest.approx(0.1)
    assert train.lr_factor(60, types.SimpleNamespace(**{**vars(cfg), "lr_schedule": "step"})) == 0.1


def test_tensorboard_gets_every_logged_number(tmp_path, monkeypatch):
    """tensorboard=True: each train log's scalars and each val metric, per-class APs by class name."""
    written, closed = [], []

    class Writer:
        def __init__(self, folder):
            written.append(("folder", folder))

        def add_scalar(self, tag, value, step):
            written.append((tag, step))

        def close(self):
            closed.append(True)

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    make_shapes(tmp_path / "data", 4, 2)
    run(tmp_path / "out", tmp_path / "data", max_iters=2, eval_interval=2, tensorboard=True)
    tags = {tag for tag, _ in written}
    assert ("folder", str(tmp_path / "out" / "tensorboard")) in written and closed == [True]
    assert {"loss", "loss_ce", "lr", "val_mAP50", "val_mAP"} <= tags and ("loss", 2) in written
    assert any(tag.startswith("val_AP") and tag.endswith("/circle") for tag in tags)


def test_a_softmax_checkpoint_starts_a_sigmoid_model_with_new_class_heads():
    """A paper (softmax, "no object") checkpoint into a model with a sigmoid cls_loss: everything loads but the
    class heads, whose K sigmoid rows mean other scores (they start new, at the prior); and back."""
    torch.manual_seed(0)
    small = dict(backbone="resnet18", hidden_dim=32, num_heads=4, num_encoder_layers=1, num_decoder_layers=2,
                 dim_feedforward=64, num_queries=8, anchor_queries=True)
    pretrained = AdditionsDETR(3, **small)
    model = AdditionsDETR(3, **small, cls_loss="iou_aware")
    pretrained.classes = model.classes = ["circle", "square", "star"]
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    done = weights.transfer_weights(pretrained, model, "vanilla")
    assert "class_head" in done["new"] and "class_head" not in done["loaded"] and "decoder" in done["loaded"]
    assert model.class_head.weight.shape == (3, 32) and torch.equal(model.class_head.bias, fresh["class_head.bias"])
    assert torch.equal(model.state_dict()["decoder.1.linear1.weight"],
                       pretrained.state_dict()["decoder.1.linear1.weight"])
    back = AdditionsDETR(3, **small)
    back.classes = model.classes
    assert "class_head" in weights.transfer_weights(model, back, "sigmoid")["new"]
    sigmoid_twin = AdditionsDETR(3, **small, cls_loss="focal")  # focal and iou_aware read their scores alike
    sigmoid_twin.classes = model.classes
    assert "class_head" in weights.transfer_weights(model, sigmoid_twin, "sigmoid")["loaded"]
