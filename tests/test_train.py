"""Matcher, set loss, gradient accumulation, exact resume, atomic checkpoints, overfitting, DDP."""

import itertools
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_convert, generalized_box_iou

from lib import metrics
import train
from data import pipeline
from lib import weights
from conftest import ROOT, load_script
from additions.model import build_model
from detr import DETR


def box(cx, cy=0.5, w=0.1, h=0.1):
    return [cx, cy, w, h]


def test_matcher_finds_the_optimum_where_greedy_fails():
    # L1 costs: query0-target0 0.05, query0-target1 0.1, query1-target0 0.45, query1-target1 0.6.
    # Greedy takes the cheapest pair first (0.05 + 0.6 = 0.65); the optimum crosses (0.1 + 0.45 = 0.55).
    matcher = train.HungarianMatcher(cost_class=0, cost_bbox=1, cost_giou=0)
    outputs = {"pred_logits": torch.zeros(1, 2, 3), "pred_boxes": torch.tensor([[box(0.5), box(0.0)]])}
    targets = [{"labels": torch.tensor([0, 1]), "boxes": torch.tensor([box(0.45), box(0.6)])}]
    (pred, tgt), = matcher(outputs, targets)
    assert dict(zip(pred.tolist(), tgt.tolist())) == {0: 1, 1: 0}


def hand_cost(logits, boxes, tgt_labels, tgt_boxes):
    """The paper's matching cost written out pair by pair."""
    cost = torch.zeros(len(logits), len(tgt_labels))
    for i, j in itertools.product(range(len(logits)), range(len(tgt_labels))):
        p = logits[i].softmax(-1)[tgt_labels[j]]
        l1 = (boxes[i] - tgt_boxes[j]).abs().sum()
        giou = generalized_box_iou(box_convert(boxes[i : i + 1], "cxcywh", "xyxy"),
                                   box_convert(tgt_boxes[j : j + 1], "cxcywh", "xyxy"))[0, 0]
        cost[i, j] = -p + 5 * l1 - 2 * giou
    return cost


def random_boxes(n, generator):
    return torch.cat([torch.rand(n, 2, generator=generator) * 0.6 + 0.2,
                      torch.rand(n, 2, generator=generator) * 0.3 + 0.05], 1)


def test_matcher_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    matcher = train.HungarianMatcher()
    for _ in range(10):
        B, Q = 3, 5
        logits, boxes = torch.randn(B, Q, 4, generator=g), random_boxes(B * Q, g).view(B, Q, 4)
        targets = [{"labels": torch.randint(0, 3, (n,), generator=g), "boxes": random_boxes(n, g)} for n in (3, 0, 4)]
        result = matcher({"pred_logits": logits, "pred_boxes": boxes}, targets)
        for b, (pred, tgt) in enumerate(result):
            n = len(targets[b]["labels"])
            assert len(pred) == len(tgt) == n
            cost = hand_cost(logits[b], boxes[b], targets[b]["labels"], targets[b]["boxes"])
            best = min((sum(cost[q, j] for j, q in enumerate(perm)) for perm in itertools.permutations(range(Q), n)),
                       default=0.0)
            assert float(sum(cost[p, t] for p, t in zip(pred, tgt))) == pytest.approx(float(best), abs=1e-5)
        # every layer at once gives the same as one layer at a time
        per_layer = matcher({"pred_logits": torch.stack([logits, logits.flip(1)]),
                             "pred_boxes": torch.stack([boxes, boxes.flip(1)])}, targets)
        flipped = matcher({"pred_logits": logits.flip(1), "pred_boxes": boxes.flip(1)}, targets)
        for a, b in zip(per_layer[0] + per_layer[1], result + flipped):
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_criterion_by_hand_two_queries_one_target():
    logits = torch.tensor([[[2.0, 0.5, 0.1], [0.3, 0.2, 1.5]]])  # 2 classes + no object
    boxes = torch.tensor([[box(0.3), box(0.8)]])
    target = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.32, 0.5, 0.12, 0.1]])}]
    for eos in (0.1, 1.0):
        criterion = train.SetCriterion(train.HungarianMatcher(), eos_coef=eos)
        losses = criterion({"pred_logits": logits, "pred_boxes": boxes}, target)
        # query 0 is the match: class 0; query 1 is "no object" (class 2) weighted by eos
        ce0 = -F.log_softmax(logits[0, 0], -1)[0]
        ce1 = -F.log_softmax(logits[0, 1], -1)[2]
        assert losses["loss_ce"].item() == pytest.approx(((ce0 + eos * ce1) / (1 + eos)).item(), rel=1e-6)
    assert losses["loss_bbox"].item() == pytest.approx(0.02 + 0.02, rel=1e-5)  # |0.3-0.32| + |0.1-0.12|
    # IoU of [0.25,0.45,0.35,0.55] and [0.26,0.45,0.38,0.55]: inter 0.09*0.1, union 0.013 - 0.009 + 0.012; hull = union
    iou = 0.009 / (0.01 + 0.012 - 0.009)
    assert losses["loss_giou"].item() == pytest.approx(1 - iou, rel=1e-4)
    assert losses["loss"].item() == pytest.approx(losses["loss_ce"].item() + 5 * 0.04 + 2 * (1 - iou), rel=1e-5)


def test_criterion_aux_layers_and_zero_targets():
    torch.manual_seed(0)
    criterion = train.SetCriterion(train.HungarianMatcher())
    aux = [{"pred_logits": torch.randn(2, 4, 4), "pred_boxes": torch.rand(2, 4, 4)} for _ in range(2)]
    logits = torch.randn(2, 4, 4, requires_grad=True)
    outputs = {"pred_logits": logits, "pred_boxes": torch.rand(2, 4, 4), "aux_outputs": aux}
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * 2
    losses = criterion(outputs, empty)
    assert set(losses) == {"loss"} | {f"loss_{k}{s}" for k in ("ce", "bbox", "giou") for s in ("", "_0", "_1")}
    assert losses["loss_bbox"] == 0 and losses["loss_giou_1"] == 0
    # every query must say "no object": the cross-entropy is the mean over all 8 queries
    expected = -F.log_softmax(logits, -1)[..., 3].mean()
    assert losses["loss_ce"].item() == pytest.approx(expected.item(), rel=1e-6)
    losses["loss"].backward()
    assert logits.grad.abs().sum() > 0
    # the total weighs every layer 1 / 5 / 2
    one = [{"labels": torch.tensor([1]), "boxes": torch.tensor([box(0.5)])}] * 2
    losses = criterion(outputs, one)
    total = sum(w * losses[f"loss_{k}{s}"] for k, w in (("ce", 1), ("bbox", 5), ("giou", 2)) for s in ("", "_0", "_1"))
    assert losses["loss"].item() == pytest.approx(total.item(), rel=1e-6)


def tiny_model(**kwargs):
    args = dict(num_classes=3, backbone="resnet18", hidden_dim=32, num_heads=4, num_encoder_layers=1,
                num_decoder_layers=2, dim_feedforward=64, num_queries=6, dropout=0.0)
    return DETR(**{**args, **kwargs})


def test_gradient_accumulation_equals_one_big_batch():
    torch.manual_seed(0)
    model = tiny_model()
    criterion = train.SetCriterion(train.HungarianMatcher())
    images = torch.randn(4, 3, 64, 64)
    g = torch.Generator().manual_seed(1)
    targets = [{"labels": torch.randint(0, 3, (n,), generator=g), "boxes": random_boxes(n, g)} for n in (1, 3, 0, 2)]

    criterion(model(images), targets)["loss"].backward()
    big = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    num_boxes = 6
    class_weight_sum = 6 + 0.1 * (4 * 6 - 6)
    for half in (slice(0, 2), slice(2, 4)):
        criterion(model(images[half]), targets[half], num_boxes, class_weight_sum)["loss"].backward()
    assert len(big) > 20
    for n, p in model.named_parameters():
        if n in big:
            assert (p.grad - big[n]).abs().max() <= 1e-5, n


def make_shapes(folder, num_train, num_val, image_size=64, **overrides):
    shapes = load_script("data/shapes/prepare.py")
    (shapes.out_dir, shapes.num_train, shapes.num_val, shapes.image_size,
     shapes.workers) = str(folder), num_train, num_val, image_size, 1
    for k, v in overrides.items():
        setattr(shapes, k, v)
    shapes.main()


TINY = dict(backbone="resnet18", pretrained_backbone=False, hidden_dim=32, num_heads=4, num_encoder_layers=1,
            num_decoder_layers=2, dim_feedforward=64, num_queries=8, dropout=0.1, batch_size=2, num_workers=0,
            train_scales=[48, 64], max_size=96, crop_scales=[56, 64], crop_size=(40, 64), val_scale=64,
            learning_rate=1e-3, lr_backbone=1e-4, log_interval=1, eval_interval=100, lr_drop=4, warmup_iters=2)


def run(folder, data, **overrides):
    config = train.get_config([])
    config.update(TINY, dataset=str(data), out_dir=str(folder), **overrides)
    return train.train(config)


def test_resume_continues_exactly(tmp_path):
    make_shapes(tmp_path / "data", 10, 2)
    run(tmp_path / "straight", tmp_path / "data", max_iters=6)
    run(tmp_path / "split", tmp_path / "data", max_iters=3)
    first = torch.load(tmp_path / "split" / "ckpt.pt", weights_only=False)
    assert first["iter_num"] == 3 and first["classes"] == ["circle", "square", "triangle", "star"]
    run(tmp_path / "split", tmp_path / "data", max_iters=6, init_from="resume")
    a = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=False)
    b = torch.load(tmp_path / "split" / "ckpt.pt", weights_only=False)
    assert a["iter_num"] == b["iter_num"] == 6
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert not torch.equal(a["model"]["class_head.weight"], first["model"]["class_head.weight"])  # it did train
    log = [json.loads(line) for line in open(tmp_path / "split" / "log.jsonl")]
    assert [r["iter"] for r in log if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["lr"] for r in log if "loss" in r] == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3, 1e-4, 1e-4])


def test_killed_while_writing_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    make_shapes(tmp_path / "data", 4, 2)
    run(tmp_path / "out", tmp_path / "data", max_iters=2)
    real_save = torch.save

    def dying_save(obj, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half a checkpo")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "out", tmp_path / "data", max_iters=4, init_from="resume")
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(tmp_path / "out" / "ckpt.pt", weights_only=False)["iter_num"] == 2


def test_non_finite_loss_stops_and_keeps_the_checkpoint(tmp_path, monkeypatch, capsys):
    make_shapes(tmp_path / "data", 4, 2)
    run(tmp_path / "out", tmp_path / "data", max_iters=2)
    real_forward = train.SetCriterion.forward
    calls = []

    def nan_on_the_second_call(self, *args, **kwargs):
        losses = real_forward(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    monkeypatch.setattr(train.SetCriterion, "forward", nan_on_the_second_call)
    handlers = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)]
    with pytest.raises(SystemExit):
        run(tmp_path / "out", tmp_path / "data", max_iters=6, init_from="resume", log_interval=3)
    assert "the loss is not finite at iteration 3" in capsys.readouterr().out
    # the pre-emption handlers are gone with the run (left behind, they made later forked workers unkillable)
    assert [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)] == handlers
    assert torch.load(tmp_path / "out" / "ckpt.pt", weights_only=False)["iter_num"] == 2


def test_overfits_two_images_to_perfect_map(tmp_path):
    make_shapes(tmp_path, 2, 0, image_size=64, min_objects=1, max_objects=2)
    transform = pipeline.make_transforms(False, [64], 65, [64], (64, 64), val_scale=64)
    dataset = pipeline.DetectionDataset(tmp_path / "train.json", transform)
    images, mask, targets = pipeline.collate([dataset[0], dataset[1]])
    torch.manual_seed(0)
    model = tiny_model(num_classes=4, num_queries=4, num_encoder_layers=1, num_decoder_layers=1, hidden_dim=64,
                       frozen_bn=False, trainable_layers=5)
    criterion = train.SetCriterion(train.HungarianMatcher())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=1e-4)
    losses = []
    for step in range(300):
        loss = criterion(model(images, mask), targets)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]
    model.eval()
    detections = model.postprocess(model(images, mask), [[64, 64], [64, 64]])
    ground_truths = [{"boxes": torch.tensor(r["boxes"]), "labels": torch.tensor(r["labels"])} for r in dataset.records]
    assert metrics.compute_map([{k: v.detach() for k, v in d.items()} for d in detections], ground_truths,
                               4)["mAP50"] == 1.0


DDP_SCRIPT = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
import train
config = train.get_config([])
config.update({config!r})
model, metrics = train.train(config)
torch.save(model.state_dict(), {out!r} + f"/weights_{{__import__('os').environ['RANK']}}.pt")
"""


def run_ddp(script_text, tmp_path, config):
    """Two processes under torchrun running script_text (formatted with root, config, out), each
    saving its final weights as out/weights_<rank>.pt. Returns the finished process."""
    script = tmp_path / "ddp.py"
    script.write_text(script_text.format(root=str(ROOT), config=config, out=str(tmp_path)))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script)], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_ddp_two_processes_agree(tmp_path):
    make_shapes(tmp_path / "data", 8, 5)  # 5 val images: the two processes evaluate 2 and 1 batches
    run_ddp(DDP_SCRIPT, tmp_path, dict(TINY, dataset=str(tmp_path / "data"), out_dir=str(tmp_path / "out"),
                                       max_iters=3))
    a, b = (torch.load(tmp_path / f"weights_{r}.pt") for r in (0, 1))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    start = build_model(**torch.load(tmp_path / "out" / "ckpt.pt", weights_only=False)["model_args"]).state_dict()
    assert not torch.equal(a["class_head.weight"], start["class_head.weight"])
    log = [json.loads(line) for line in open(tmp_path / "out" / "log.jsonl")]
    assert log[-1]["iter"] == 3 and "val_mAP50" in log[-1]


def test_fine_tune_from_an_official_checkpoint_gets_a_new_class_head(tmp_path):
    make_shapes(tmp_path / "data", 4, 2)
    official = DETR(num_classes=7, backbone="resnet18", hidden_dim=32, num_heads=8, num_encoder_layers=1,
                    num_decoder_layers=2, dim_feedforward=64, num_queries=8)
    torch.save({"model": {weights.minidetr_to_official_key(k): v for k, v in official.state_dict().items()}},
               tmp_path / "official.pth")
    run(tmp_path / "out", tmp_path / "data", max_iters=1, init_from=str(tmp_path / "official.pth"))
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=False)
    assert ckpt["model_args"]["num_classes"] == 4 and ckpt["model"]["class_head.weight"].shape == (5, 32)
    # everything but the class head starts from the official weights (one small step away from them)
    start, tuned = official.state_dict()["query_embed.weight"], ckpt["model"]["query_embed.weight"]
    assert 0 < (start - tuned).abs().max() < 1e-2
    assert torch.equal(official.state_dict()["backbone.conv1.weight"], ckpt["model"]["backbone.conv1.weight"])


def test_config_bare_boolean_flag_and_file_then_flags_order(tmp_path):
    (tmp_path / "c.py").write_text("batch_size = 4\neval_only = False\n")
    config = train.get_config([str(tmp_path / "c.py"), "--eval_only", "--batch_size=6", "--learning_rate=1"])
    assert config["eval_only"] is True and config["batch_size"] == 6 and config["learning_rate"] == 1.0
    assert train.get_config(["--eval_only=False"])["eval_only"] is False


def test_too_few_queries_and_a_low_max_dets_are_one_warning_line_each(tmp_path, capsys):
    """A query finds one object at most: images with more objects than num_queries are counted; and COCO's
    metrics count max_dets detections of an image and class (AR<max_dets> in the log)."""
    make_shapes(tmp_path / "data", 4, 2, min_objects=3, max_objects=3)
    run(tmp_path / "out", tmp_path / "data", max_iters=1, eval_interval=1, num_queries=2, max_dets=1)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: ")]
    assert lines[0].startswith("warning: num_queries=2 but max_dets=1: COCO's mAP counts only the 1 best")
    assert (lines[1].startswith("warning: 4 of the 4 images of ") and "train.json" in lines[1]
            and "(up to 3)" in lines[1])
    assert lines[2].startswith("warning: 2 of the 2 images of ") and len(lines) == 3
    log = [json.loads(line) for line in open(tmp_path / "out" / "log.jsonl")]
    assert "val_AR1" in log[-1] and "val_AR100" not in log[-1] and len(log[-1]["val_AP50_per_class"]) == 4
