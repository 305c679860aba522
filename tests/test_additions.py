"""The additions beyond the paper (additions/): each one's mechanism, and that with all of them off the
model is exactly the paper's DETR."""

import math
from types import SimpleNamespace

import pytest
import torch

import additions.loss
import additions.model
import detr
import train
from lib.run import training_diagnostics
from additions.loss import AdditionsCriterion, AdditionsMatcher
from additions.model import AdditionsDETR, build_model, model_args
from lib import weights
from conftest import ROOT
from detr import DETR


def tiny(**kwargs):
    args = dict(num_classes=3, backbone="resnet18", hidden_dim=32, num_heads=4, num_encoder_layers=1,
                num_decoder_layers=3, dim_feedforward=64, num_queries=5, dropout=0.0, feature_stride=8)
    return AdditionsDETR(**{**args, **kwargs})


def targets_of(*counts, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"labels": torch.randint(0, 3, (n,), generator=g),
             "boxes": torch.cat([torch.rand(n, 2, generator=g) * 0.6 + 0.2,
                                 torch.rand(n, 2, generator=g) * 0.3 + 0.1], 1)}
            for n in counts]


def test_all_off_is_the_paper_model():
    torch.manual_seed(0)
    args = dict(num_classes=3, backbone="resnet18", hidden_dim=32, num_heads=4, num_encoder_layers=1,
                num_decoder_layers=3, dim_feedforward=64, num_queries=5, dropout=0.0, feature_stride=32)
    model = build_model(**args)
    assert type(model) is DETR and not any(k.startswith(("anchor", "box_pos", "proposal", "label_embed"))
                                           for k in model.state_dict())
    assert set(detr.parameters_by_part(model)) == {"backbone", "input_proj", "encoder", "decoder", "query_embed",
                                                   "class_head", "box_head"}
    model.train()  # without additions, training mode (dropout 0) changes nothing and no extra outputs appear
    out = model(torch.randn(2, 3, 64, 64))
    assert set(out) == {"pred_logits", "pred_boxes", "aux_outputs"} and out["pred_logits"].shape == (2, 5, 4)


@pytest.mark.parametrize("first", ["config/shapes.py", "config/voc_mini.py", "config/voc.py", "config/custom.py"])
def test_config_vanilla_composes_the_paper_model_onto_any_config(first):
    config = train.get_config([str(ROOT / first), str(ROOT / "config" / "vanilla.py")])
    assert not (config["anchor_queries"] or config["encoder_proposals"] or config["conditional_cross_attn"])
    assert config["denoising_groups"] == 0 and config["query_groups"] == 1
    assert not (config["dn_contrastive"] or config["look_forward_twice"]
                or config["mosaic_prob"]) and config["cls_loss"] == "ce"
    model = weights.new_model(SimpleNamespace(**{**config, "backbone": "resnet18", "pretrained_backbone": False}), 3, 5)
    assert set(detr.parameters_by_part(model)) == {"backbone", "input_proj", "encoder", "decoder", "query_embed",
                                                   "class_head", "box_head"}


@pytest.mark.parametrize("stride, tokens, channels", [(32, 2 * 2, 512), (16, 4 * 4, 256), (8, 8 * 8, 128)])
def test_feature_stride_gives_a_finer_grid(stride, tokens, channels):
    model = tiny(feature_stride=stride).eval()
    assert model.backbone.num_channels == channels
    assert hasattr(model.backbone, "layer4") == (stride == 32) and hasattr(model.backbone, "layer3") == (stride >= 16)
    out = model(torch.randn(1, 3, 64, 64), need_weights=True)
    assert out["dec_attn"][0].shape[-1] == tokens
    with pytest.raises(ValueError, match="feature_stride"):
        tiny(feature_stride=4)
    r50 = AdditionsDETR(3, backbone="resnet50", feature_stride=16, num_encoder_layers=1, num_decoder_layers=1)
    assert r50.backbone.num_channels == 1024


def test_anchor_boxes_are_refined_layer_by_layer():
    torch.manual_seed(0)
    model = tiny(anchor_queries=True).eval()
    last = model.box_head[-1]
    torch.nn.init.zeros_(last.weight)
    with torch.no_grad():
        last.bias.copy_(torch.tensor([0.3, -0.2, 0.1, 0.0]))  # every layer moves every box by this, before the sigmoid
    out = model(torch.randn(2, 3, 64, 64))
    anchors = model.anchor_embed.weight
    layers = [o["pred_boxes"] for o in out["aux_outputs"]] + [out["pred_boxes"]]
    for n, boxes in enumerate(layers, start=1):
        expected = (anchors + n * last.bias).sigmoid()
        assert (boxes - expected).abs().max() < 1e-5
    # the queries' positions come from their boxes: other anchors, other class scores
    with torch.no_grad():
        model.anchor_embed.weight[0] += 2.0
    assert not torch.allclose(model(torch.randn(2, 3, 64, 64))["pred_logits"][:, 0], out["pred_logits"][:, 0])


def test_encoder_proposals_start_the_queries_at_the_best_tokens():
    torch.manual_seed(0)
    model = tiny(anchor_queries=True, encoder_proposals=True).eval()
    torch.nn.init.zeros_(model.box_head[-1].weight)
    torch.nn.init.zeros_(model.box_head[-1].bias)  # the decoder keeps the boxes it is given
    images = torch.randn(2, 3, 64, 96)
    mask = torch.zeros(2, 64, 96, dtype=torch.bool)
    mask[1, :, 48:] = True  # the second image is half padding
    out = model(images, mask)
    enc = out["enc_outputs"]
    assert enc["pred_logits"].shape == (2, 8 * 12, 4) and enc["valid"][1].sum() == 8 * 6
    objectness = 1 - enc["pred_logits"].softmax(-1)[..., -1]
    for b in range(2):
        top = objectness[b].masked_fill(~enc["valid"][b], -1).topk(5).indices
        assert enc["valid"][b, top].all()  # padding tokens are never chosen while real ones are left
        assert torch.allclose(out["pred_boxes"][b], enc["pred_boxes"][b, top], atol=1e-6)
    # a token's anchor is centred on it, in units of its own image's valid size
    torch.nn.init.zeros_(model.proposal_box_head[-1].weight)
    torch.nn.init.zeros_(model.proposal_box_head[-1].bias)
    boxes = model(images, mask)["enc_outputs"]["pred_boxes"].view(2, 8, 12, 4)
    assert boxes[0, 3, 5].tolist() == pytest.approx([5.5 / 12, 3.5 / 8, 0.05, 0.05], abs=1e-5)
    assert boxes[1, 3, 5].tolist() == pytest.approx([5.5 / 6, 3.5 / 8, 0.05, 0.05], abs=1e-5)
    with pytest.raises(ValueError, match="at least num_queries"):
        tiny(anchor_queries=True, encoder_proposals=True, num_queries=10,
             feature_stride=32).eval()(torch.randn(1, 3, 64, 64))


def test_encoder_proposals_are_matched_and_padding_never_is():
    criterion = AdditionsCriterion(train.SetCriterion(train.HungarianMatcher()))
    logits, boxes = torch.zeros(1, 4, 4), torch.tensor([[[0.5, 0.5, 0.2, 0.2]] * 4])
    valid = torch.tensor([[False, True, True, False]])
    targets = [{"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]] * 2)}]
    (pred, _), = criterion.matcher({"pred_logits": logits, "pred_boxes": boxes, "valid": valid}, targets)
    assert sorted(pred.tolist()) == [1, 2]
    outputs = {"pred_logits": torch.zeros(1, 2, 4), "pred_boxes": torch.rand(1, 2, 4),
               "enc_outputs": {"pred_logits": logits, "pred_boxes": boxes, "valid": valid}}
    losses = criterion(outputs, targets)
    assert losses["loss_bbox_enc"] == 0 and losses["loss_giou_enc"] < 1e-5  # two valid tokens sit on the two objects
    assert losses["loss"] > losses["loss_ce"] + 5 * losses["loss_bbox"] + 2 * losses["loss_giou"]
    # padding tokens are in no loss: whatever they predict, the losses stay the same
    outputs["enc_outputs"]["pred_logits"] = logits.clone().index_fill_(1, torch.tensor([0, 3]), 7.0)
    assert all(torch.equal(v, losses[k]) for k, v in criterion(outputs, targets).items())


def test_proposal_background_weighs_as_its_objects_at_any_token_count():
    """The tokens that match no object target "no object"; together they weigh PROPOSAL_BACKGROUND_WEIGHT
    times the image's objects, however many tokens the image has, so the encoder's class loss does
    not grow with the image (a cross-entropy summed over the tokens would)."""
    criterion = AdditionsCriterion(train.SetCriterion(train.HungarianMatcher()))
    targets = targets_of(2, 0)
    for tokens in (16, 400):
        valid = torch.ones(2, tokens, dtype=torch.bool)
        valid[1, tokens // 2 :] = False  # the second image half padding
        weight = additions.loss.proposal_background_weight(targets, valid)
        assert weight[0].sum() == pytest.approx(additions.loss.PROPOSAL_BACKGROUND_WEIGHT * 2 * tokens / (tokens - 2))
        assert weight[1].sum() == pytest.approx(additions.loss.PROPOSAL_BACKGROUND_WEIGHT * 1)  # no objects: as one
        assert (weight[~valid] == 0).all()
        # every token unsure between the 3 classes and "no object": the loss is the same at both token counts
        outputs = {"pred_logits": torch.zeros(2, 4, 4), "pred_boxes": torch.rand(2, 4, 4),
                   "enc_outputs": {"pred_logits": torch.zeros(2, tokens, 4), "valid": valid,
                                   "pred_boxes": torch.rand(2, tokens, 4, generator=torch.Generator().manual_seed(0))}}
        ln4 = torch.log(torch.tensor(4.0)).item()
        # objects + background, over 2 boxes
        expected = (2 * ln4 + additions.loss.PROPOSAL_BACKGROUND_WEIGHT * (2 + 1) * ln4) / 2
        assert criterion(outputs, targets)["loss_ce_enc"].item() == pytest.approx(expected, rel=1e-5)


def noiseless(monkeypatch):
    monkeypatch.setattr(additions.model, "DN_BOX_NOISE", 0.0)
    monkeypatch.setattr(additions.model, "DN_LABEL_NOISE", 0.0)


def test_real_queries_cannot_see_denoising_queries(monkeypatch):
    torch.manual_seed(0)
    model = tiny(anchor_queries=True, denoising_groups=2).train()  # dropout 0: training mode is deterministic
    images = torch.randn(2, 3, 64, 64)
    plain = model(images)
    for seed in (1, 2):  # whatever the denoising queries hold, the real queries' outputs stay the same
        out = model(images, targets=targets_of(3, 1, seed=seed))
        n = additions.model.DN_MIN_SLOTS  # an image's slots per group: the most objects (3) rounded up to 8, 16, ...
        assert out["dn_outputs"]["pred_logits"].shape == (3, 2, 2 * n, 4)  # (layers, B, groups * slots, K+1)
        assert torch.allclose(out["pred_logits"], plain["pred_logits"], atol=1e-6)
        assert torch.allclose(out["pred_boxes"], plain["pred_boxes"], atol=1e-6)
    # denoising groups cannot see each other either: without noise each group alone gives the same outputs
    noiseless(monkeypatch)
    out = model(images, targets=targets_of(3, 1))["dn_outputs"]
    model.denoising_groups = 1
    one = model(images, targets=targets_of(3, 1))["dn_outputs"]
    for g in range(2):
        assert torch.allclose(out["pred_boxes"][:, :, g * n : g * n + n], one["pred_boxes"], atol=1e-6)
    # and the padded queries (the second image has 1 object in its slots) are seen by nobody
    out2 = model(images, targets=[targets_of(3, 1)[0], targets_of(3, 1, seed=5)[1]])["dn_outputs"]
    assert torch.allclose(out2["pred_boxes"][:, 0], one["pred_boxes"][:, 0], atol=1e-6)


def test_denoising_noise_stays_within_the_paper_bounds():
    torch.manual_seed(0)
    model = tiny(anchor_queries=True, denoising_groups=50)
    targets = targets_of(4, 2)
    tgt, boxes, allowed = additions.model.add_denoising_queries(model, targets, torch.zeros(2, 5, 32),
                                                                torch.rand(2, 5, 4), None)
    n = additions.model.DN_MIN_SLOTS  # slots per group: 4 objects at most, rounded up to 8
    noised = boxes[0, 5:].view(50, n, 4)[:, :4]  # (groups, objects, 4)
    gt = targets[0]["boxes"]
    shift = (noised[..., :2] - gt[:, :2]).abs() / gt[:, 2:]
    scale = (noised[..., 2:] / gt[:, 2:] - 1).abs()
    assert shift.max() <= 0.2 + 1e-6 and scale.max() <= 0.4 + 1e-6 and shift.max() > 0.15 and scale.max() > 0.3
    swapped = (tgt[0, 5:].view(50, n, -1)[:, :4] != model.label_embed(targets[0]["labels"])).any(-1).float().mean()
    assert 0.05 < swapped < 0.25  # labels are swapped with probability 0.2 (sometimes for the same label)
    assert allowed.shape == (2, 1, 5 + 50 * n, 5 + 50 * n)
    assert not allowed[:, 0, :5, 5:].any() and allowed[:, 0, 5:, :5].all()
    # the second image has 2 objects in 8 slots: its padded slots hold no content, so no padded slot looks
    # like a real object of some class to the decoder (DINO); the real ones all hold a label's embedding
    content = tgt[1, 5:].view(50, n, -1)
    assert (content[:, 2:] == 0).all() and (content[:, :2] != 0).any(-1).all()


def test_denoising_loss_needs_no_matching():
    criterion = AdditionsCriterion(train.SetCriterion(train.HungarianMatcher()))
    targets = targets_of(2, 1)
    # two groups of 2 slots; each slot predicts its own target exactly (the second image's second slot is padding)
    boxes = torch.zeros(1, 2, 4, 4)
    for b, t in enumerate(targets):
        for g in range(2):
            boxes[0, b, g * 2 : g * 2 + len(t["labels"])] = t["boxes"]
    logits = torch.full((1, 2, 4, 4), -20.0)
    for b, t in enumerate(targets):
        for g in range(2):
            logits[0, b, g * 2 + torch.arange(len(t["labels"])), t["labels"]] = 20.0
    logits[0, 1, [1, 3]] = torch.tensor([20.0, -20, -20, -20])  # the padding (second image) says class 0: no matter
    outputs = {"pred_logits": torch.zeros(2, 3, 4), "pred_boxes": torch.rand(2, 3, 4),
               "dn_outputs": {"pred_logits": logits, "pred_boxes": boxes, "groups": 2, "contrastive": False}}
    losses = criterion(outputs, targets)
    assert losses["loss_bbox_dn"] < 1e-6 and losses["loss_giou_dn"] < 1e-5 and losses["loss_ce_dn"] < 1e-6
    boxes[0, 0, 0, 0] += 0.1  # one copy of one object off by 0.1: L1 0.1 over 3 objects x 2 groups
    losses = criterion(outputs, targets)
    assert losses["loss_bbox_dn"].item() == pytest.approx(0.1 / 6, rel=1e-4)


def test_query_groups_see_only_themselves_and_one_group_runs_at_inference():
    torch.manual_seed(0)
    model = tiny(query_groups=3, anchor_queries=True)
    images = torch.randn(2, 3, 64, 64)
    trained = model.train()(images)
    assert trained["pred_logits"].shape == (2, 15, 4)
    first = model.eval()(images)
    assert first["pred_logits"].shape == (2, 5, 4)
    assert torch.allclose(trained["pred_logits"][:, :5], first["pred_logits"], atol=1e-5)
    assert torch.allclose(trained["pred_boxes"][:, :5], first["pred_boxes"], atol=1e-6)


def test_each_group_is_matched_one_to_one_on_its_own():
    torch.manual_seed(0)
    matcher = train.HungarianMatcher()
    logits, boxes = torch.randn(1, 4, 4), torch.rand(1, 4, 4) * 0.5 + 0.2
    targets = targets_of(3)
    single = matcher({"pred_logits": logits, "pred_boxes": boxes}, targets)
    two = torch.cat([logits, logits], 1), torch.cat([boxes, boxes], 1)
    (pred, tgt), = AdditionsMatcher(matcher)({"pred_logits": two[0], "pred_boxes": two[1]}, targets, groups=2)
    assert sorted(tgt.tolist()) == [0, 0, 1, 1, 2, 2]  # every object once in each group
    (p1, t1), = single
    assert pred.tolist() == p1.tolist() + (p1 + 4).tolist() and tgt.tolist() == t1.tolist() * 2
    # identical groups: the groups' losses are averaged, so the loss is the single group's
    criterion = AdditionsCriterion(train.SetCriterion(matcher), query_groups=2)
    one = train.SetCriterion(matcher)({"pred_logits": logits, "pred_boxes": boxes}, targets)
    both = criterion({"pred_logits": two[0], "pred_boxes": two[1]}, targets)
    for key in ("loss", "loss_ce", "loss_bbox", "loss_giou"):
        assert both[key].item() == pytest.approx(one[key].item(), rel=1e-6)


def test_additions_need_box_queries():
    for kwargs in (dict(encoder_proposals=True), dict(denoising_groups=2)):
        with pytest.raises(ValueError, match="anchor_queries=False must be True"):
            tiny(**kwargs)


def test_diagnostics_see_alike_queries_and_how_each_layer_moves_the_boxes():
    torch.manual_seed(0)
    model = tiny(anchor_queries=True)
    criterion = AdditionsCriterion(train.SetCriterion(train.HungarianMatcher()))
    targets = targets_of(2, 1)
    out = model(torch.randn(2, 3, 64, 64))
    out["pred_logits"].sum().backward()
    record = training_diagnostics(model, out, targets, criterion)
    params = detr.parameters_by_part(model)["class_head"]
    assert record["grad_norm_class_head"] == pytest.approx(torch.cat([p.grad.flatten() for p in params]).norm().item(),
                                                           rel=1e-5)
    assert record["weight_norm_anchors"] > 0 and record["grad_norm_backbone"] > 0
    assert {"iou_start", "iou_layer_0", "iou_layer_1", "iou_layer_2"} <= set(record)
    same = {"pred_logits": torch.tensor([[[0.0, 1, 0, 0]] * 5] * 2), "pred_boxes": torch.full((2, 5, 4), 0.5),
            "aux_outputs": []}
    record = training_diagnostics(model, same, targets, criterion)
    assert record["query_classes"] == 1 and record["query_box_spread"] == 0 and record["query_box_image_std"] == 0
    moved = {**same, "pred_boxes": torch.stack([torch.full((5, 4), 0.3), torch.full((5, 4), 0.5)])}  # each query moves
    record = training_diagnostics(model, moved, targets, criterion)  # by 0.2 in x and y between the two images
    assert record["query_box_image_std"] == pytest.approx((2 * 0.1 ** 2) ** 0.5) and record["query_box_spread"] == 0
    apart = {"pred_logits": torch.eye(4)[[0, 1, 2, 3, 3]][None], "aux_outputs": [],
             "pred_boxes": torch.tensor([[[0.1, 0.5, 0.1, 0.1], [0.9, 0.5, 0.1, 0.1]] + [[0.5, 0.5, 0.1, 0.1]] * 3])}
    record = training_diagnostics(model, apart, targets[:1], criterion)
    assert record["query_classes"] == 4 and record["query_box_spread"] == pytest.approx((0.32 / 5) ** 0.5, rel=1e-5)
    # IoU with the matched object: a query starts at half its object's width, layer 0 gets it right, layer 1
    # makes it worse again; the denoising query starts shifted by a quarter of the width, then is exact
    truth = {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.2]])}
    half, right, shifted = [[0.5, 0.5, 0.2, 0.2]], [[0.5, 0.5, 0.4, 0.2]], [[0.6, 0.5, 0.4, 0.2]]
    layer = lambda boxes: {"pred_logits": torch.eye(4)[[2]][None], "pred_boxes": torch.tensor([boxes])}
    outputs = {**layer(shifted), "aux_outputs": [layer(right)], "start_boxes": torch.tensor([half]),
               "dn_outputs": {"pred_boxes": torch.tensor([[right]]), "pred_logits": torch.zeros(1, 1, 1, 4),
                              "start_boxes": torch.tensor([shifted]), "groups": 1, "contrastive": False}}
    record = training_diagnostics(model, outputs, [truth], criterion)
    assert record["iou_start"] == pytest.approx(0.5) and record["iou_layer_0"] == pytest.approx(1.0)
    assert record["iou_layer_1"] == pytest.approx(0.3 / 0.5)  # 0.3 x 0.2 shared of 0.5 x 0.2
    assert record["iou_dn_start"] == pytest.approx(0.6) and record["iou_dn_layer_0"] == pytest.approx(1.0)


@pytest.mark.parametrize("config_file, sizes, smaller", [
    ("config/shapes.py", (64, 256), {}),
    # config/voc.py's additions, stride and query count on a narrower, shallower model (fast on a CPU)
    ("config/voc.py", (384, 800), dict(backbone="resnet18", pretrained_backbone=False, hidden_dim=64, num_heads=4,
                                       dim_feedforward=128, num_encoder_layers=1, num_decoder_layers=2)),
    # and with the successors' keys: a sigmoid class loss, contrastive denoising, look-forward-twice
    *(("config/voc.py", (384, 800), dict(backbone="resnet18", pretrained_backbone=False, hidden_dim=64, num_heads=4,
                                         dim_feedforward=128, num_encoder_layers=1, num_decoder_layers=2,
                                         cls_loss=cls_loss, dn_contrastive=True, look_forward_twice=True))
      for cls_loss in ("focal", "iou_aware")),
])
def test_loss_parts_keep_their_balance_at_every_image_size(config_file, sizes, smaller):
    """Every loss part at the first step, as a ratio to the decoder's class loss, with the same weights,
    boxes and padding at two image sizes (4x to 16x the tokens): no part may grow with the image."""
    config = {**train.get_config([str(ROOT / config_file)]), **smaller}
    assert config["encoder_proposals"] and config["denoising_groups"] and config["query_groups"] > 1
    targets = [{"labels": torch.tensor([1, 4, 7]),
                "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.3], [0.6, 0.5, 0.4, 0.2], [0.7, 0.75, 0.15, 0.15]])},
               {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.4, 0.5, 0.3, 0.3]])}]
    ratios = []
    for size in sizes:
        torch.manual_seed(0)
        model = weights.new_model(SimpleNamespace(**config), 10, config["trainable_layers"]).train()
        criterion = train.new_criterion(SimpleNamespace(**config), model_args(model))
        # the same smooth picture at each size; the second image a quarter padding (at its right)
        images = torch.nn.functional.interpolate(torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)),
                                                 size=(size, size), mode="bilinear")
        mask = torch.zeros(2, size, size, dtype=torch.bool)
        mask[1, :, size * 3 // 4 :] = True
        with torch.no_grad():
            losses = criterion(model(images, mask, targets), targets)
        assert {"loss_ce_enc", "loss_bbox_dn", "loss_giou_0"} <= set(losses)
        ratios.append({k: v.item() / losses["loss_ce"].item() for k, v in losses.items() if k.startswith("loss_")})
    for key in ratios[0]:
        assert 1 / 2 < ratios[1][key] / ratios[0][key] < 2, (key, ratios[0][key], ratios[1][key])


def test_conditional_cross_attention_looks_where_the_box_is():
    """With the content part of layer 0's cross-attention switched off and identity spatial projections, the
    attention logit of a query is the dot product of its box centre's sine encoding with each token's: it
    peaks at the box centre, and a wider box (DAB-DETR's modulation: reference size / box size) looks wider."""
    torch.manual_seed(0)
    model = tiny(anchor_queries=True, conditional_cross_attn=True, num_decoder_layers=1, num_queries=3).eval()
    C = 32
    with torch.no_grad():
        model.decoder[0].cross_attn.in_proj_weight[: 2 * C] = 0  # content queries and keys: nothing
        for proj in (model.spatial_query_proj[0], model.spatial_key_proj[0]):
            proj.weight.copy_(torch.eye(C))
            proj.bias.zero_()
        model.spatial_size_head[-1].weight.zero_()
        model.spatial_size_head[-1].bias.fill_(math.log(0.9 / 0.1))  # reference width and height 0.9
        # an 8x8 token grid; the feature positions count tokens from 1, so token (r, c) sits at ((c+1)/8, (r+1)/8)
        boxes = torch.tensor([[3 / 8, 6 / 8, 0.05, 0.05], [7 / 8, 2 / 8, 0.05, 0.05], [7 / 8, 2 / 8, 0.5, 0.5]])
        model.anchor_embed.weight.copy_(additions.model.inverse_sigmoid(boxes))
    attn = model(torch.randn(1, 3, 64, 64), need_weights=True)["dec_attn"][0][0].mean(0)  # (Q, 64) over the heads
    assert attn.argmax(-1)[:2].tolist() == [5 * 8 + 2, 1 * 8 + 6]  # (row 5, column 2) and (row 1, column 6)
    entropy = -(attn * attn.log()).sum(-1)  # the same centre, a 10x wider box: a flatter attention
    assert entropy[2] > entropy[1] + 0.1 and attn[1].max() > 2 * attn[2].max()
    # and with conditional_cross_attn off the model has none of these parameters
    assert not any("spatial" in k for k in tiny(anchor_queries=True).state_dict())


def test_conditional_cross_attention_keeps_positions_in_its_content_part_at_the_first_layer_only():
    """Conditional DETR and DAB-DETR (keep_query_pos=False): the first decoder layer's cross-attention adds
    the positions to its content query and key as DETR does; later layers leave position to the spatial part,
    so their output does not depend on the features' positions except through the spatial key. The
    addition's matrices start from Xavier, as the papers' code: wider than PyTorch's default Linear init."""
    torch.manual_seed(0)
    model = tiny(anchor_queries=True, conditional_cross_attn=True)
    layer = model.decoder[1].eval()  # initialised as DETR initialises its layers (an Attention alone is not)
    content, query_pos, memory = torch.randn(2, 5, 32), torch.randn(2, 5, 32), torch.randn(2, 16, 32)
    spatial_query, spatial_key = torch.randn(2, 5, 32), torch.randn(2, 16, 32)
    pos, other_pos = torch.randn(2, 16, 32), torch.randn(2, 16, 32)
    for first in (True, False):
        a, _ = additions.model.decoder_layer(layer, content, query_pos, memory, pos, None,
                                             spatial=(spatial_query, spatial_key, first))
        b, _ = additions.model.decoder_layer(layer, content, query_pos, memory, other_pos, None,
                                             spatial=(spatial_query, spatial_key, first))
        assert torch.equal(a, b) != first
    for proj in [*model.spatial_query_proj, *model.spatial_key_proj, model.spatial_scale_head[0],
                 model.spatial_size_head[0]]:
        fan_out, fan_in = proj.weight.shape
        assert 1 / math.sqrt(fan_in) < proj.weight.abs().max() <= math.sqrt(6 / (fan_in + fan_out))
    # and the model passes each layer its own flag: layer 0 True, the others False
    flags = [additions.model.spatial_query_and_key(model, i, torch.randn(1, 5, 32), torch.rand(1, 5, 4) * 0.5 + 0.25,
                                        torch.randn(1, 5, 4, 16), torch.randn(1, 16, 32))[2] for i in range(3)]
    assert flags == [True, False, False]


# --- additions 6 to 8: the successors' recipe (sigmoid class losses, look forward twice, contrastive denoising)


def test_focal_loss_is_torchvisions_and_iou_aware_targets_the_boxs_iou():
    """cls_loss='focal' is the focal loss of Lin et al. (torchvision's sigmoid_focal_loss, alpha 0.25, gamma 2);
    'iou_aware' (DEIM's MAL) has its minimum where a matched query's score is its box's IoU^gamma, and
    takes no gradient through the IoU."""
    from torchvision.ops import sigmoid_focal_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, 4, requires_grad=True)  # (L, B, Q, K)
    target_classes = torch.randint(0, 5, (2, 3, 5))  # 4: "no object"
    iou = torch.rand(2, 3, 5, requires_grad=True)
    onehot = torch.nn.functional.one_hot(target_classes, 5)[..., :4].float()
    focal = additions.loss.sigmoid_class_loss(logits, target_classes, iou, "focal")
    assert torch.allclose(focal, sigmoid_focal_loss(logits, onehot, 0.25, 2.0, reduction="none").sum(-1), atol=1e-6)
    # iou_aware: one matched query's score at IoU^1.5 is the loss's minimum; a negative weighs p^1.5 x BCE(p, 0)
    u = torch.tensor(0.7)
    at = torch.full((1, 1, 1, 2), -3.0)
    at[..., 1] = torch.logit(u ** additions.loss.IOU_AWARE_GAMMA)
    at.requires_grad_(True)
    loss = additions.loss.sigmoid_class_loss(at, torch.tensor([[[1]]]), u.view(1, 1, 1), "iou_aware")
    (grad,) = torch.autograd.grad(loss.sum(), at)
    # the matched class sits still, the other goes down
    assert abs(grad[..., 1].item()) < 1e-6 and grad[..., 0].item() > 0
    p = torch.sigmoid(torch.tensor(-3.0))
    bce = -torch.log(1 - p)
    expected = p ** 1.5 * bce - (u ** 1.5 * torch.log(u ** 1.5) + (1 - u ** 1.5) * torch.log(1 - u ** 1.5))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    aware = additions.loss.sigmoid_class_loss(logits, target_classes, iou, "iou_aware")
    assert torch.autograd.grad(aware.sum(), iou, allow_unused=True)[0] is None
    # a better box of the same class asks for a higher score: at the 0.7 box's optimum, the 0.9 box's loss pushes it up
    better = additions.loss.sigmoid_class_loss(at, torch.tensor([[[1]]]), torch.tensor([[[0.9]]]), "iou_aware")
    assert torch.autograd.grad(better.sum(), at)[0][..., 1].item() < -0.01


def test_focal_matching_cost_prefers_the_confident_right_class():
    """Deformable DETR's class cost: positive focal term less the negative one, per prediction and target;
    the sigmoid matcher pairs each target with the query that scores its class."""
    logits = torch.tensor([[4.0, -4.0, -4.0], [-4.0, 4.0, -4.0]])
    cost = additions.loss.focal_matching_cost(logits, torch.tensor([1, 0]))  # (2 predictions, 2 targets)
    assert cost[1, 0] < cost[0, 0] and cost[0, 1] < cost[1, 1]
    p = torch.sigmoid(torch.tensor(4.0))
    assert cost[0, 1].item() == pytest.approx((0.25 * (1 - p) ** 2 * -p.log() - 0.75 * p ** 2 * -(1 - p).log()).item(),
                                              rel=1e-4)
    boxes = torch.tensor([[[0.3, 0.3, 0.2, 0.2], [0.3, 0.3, 0.2, 0.2]]])  # the same box: only the class decides
    targets = [{"labels": torch.tensor([1, 0]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.3, 0.3, 0.2, 0.2]])}]
    (pred, tgt), = AdditionsMatcher(train.HungarianMatcher(), sigmoid=True)(
        {"pred_logits": logits[None], "pred_boxes": boxes}, targets)
    assert dict(zip(tgt.tolist(), pred.tolist())) == {1: 0, 0: 1}


def test_sigmoid_classes_have_k_outputs_everywhere_and_are_read_as_sigmoids():
    """A sigmoid cls_loss: K class outputs (no "no object") for the decoder, the proposals and denoising, each
    starting at the prior probability; the proposals are picked by their best class's sigmoid, and postprocess
    scores a query by it."""
    torch.manual_seed(0)
    model = tiny(anchor_queries=True, encoder_proposals=True, denoising_groups=1, cls_loss="focal").train()
    out = model(torch.randn(2, 3, 64, 64), targets=targets_of(2, 1))
    K = 3
    assert out["pred_logits"].shape[-1] == out["enc_outputs"]["pred_logits"].shape[-1] == K
    assert out["dn_outputs"]["pred_logits"].shape[-1] == K
    assert torch.sigmoid(out["pred_logits"]).mean().item() == pytest.approx(additions.model.PRIOR_PROBABILITY, rel=0.5)
    # the proposals' selection: the tokens whose best class has the highest sigmoid
    with torch.no_grad():
        enc_outputs, start_boxes = additions.model.propose_boxes(model, torch.randn(2, 64, 32),
                                                                 torch.zeros(2, 8, 8, dtype=torch.bool))
    top = enc_outputs["pred_logits"].sigmoid().max(-1).values.topk(5, dim=1).indices
    assert torch.equal(start_boxes, enc_outputs["pred_boxes"].gather(1, top[..., None].expand(-1, -1, 4)))
    logits = torch.tensor([[[2.0, -1.0, 0.0], [-3.0, -2.0, -4.0]]])
    result = tiny(cls_loss="focal").postprocess({"pred_logits": logits, "pred_boxes": torch.full((1, 2, 4), 0.5)},
                                                [(10, 10)])[0]
    assert (torch.allclose(result["scores"], torch.sigmoid(torch.tensor([2.0, -2.0])))
            and result["labels"].tolist() == [0, 1])
    with pytest.raises(ValueError, match="cls_loss"):
        tiny(cls_loss="softmax")


def test_sigmoid_set_loss_is_a_sum_over_queries_and_classes_over_num_boxes():
    """With cls_loss='focal' loss_ce is torchvision's focal loss summed over every query and class, over
    the number of objects (Deformable DETR), with no eos_coef; a perfect prediction costs ~nothing."""
    from torchvision.ops import sigmoid_focal_loss

    torch.manual_seed(0)
    targets = targets_of(2, 1)
    logits, boxes = torch.randn(2, 4, 3), torch.rand(2, 4, 4) * 0.5 + 0.25
    criterion = AdditionsCriterion(train.SetCriterion(train.HungarianMatcher()), cls_loss="focal")
    (p0, t0), (p1, t1) = criterion.matcher({"pred_logits": logits, "pred_boxes": boxes}, targets)
    onehot = torch.zeros(2, 4, 3)
    onehot[0, p0, targets[0]["labels"][t0]] = 1
    onehot[1, p1, targets[1]["labels"][t1]] = 1
    losses = criterion({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert losses["loss_ce"].item() == pytest.approx(sigmoid_focal_loss(logits, onehot, reduction="sum").item() / 3,
                                                     rel=1e-5)
    perfect = torch.full((2, 4, 3), -12.0)
    perfect_boxes = boxes.clone()
    for b, t in enumerate(targets):
        perfect[b, torch.arange(len(t["labels"])), t["labels"]] = 12.0
        perfect_boxes[b, : len(t["labels"])] = t["boxes"]
    losses = criterion({"pred_logits": perfect, "pred_boxes": perfect_boxes}, targets)
    assert losses["loss_ce"] < 1e-6 and losses["loss_bbox"] < 1e-6


def test_look_forward_twice_sends_a_layers_box_loss_to_the_layer_before(monkeypatch):
    """DINO §3.5: the same boxes, but the last layer's box reaches the previous layer's refinement
    (before its detach) only with look_forward_twice."""
    refined = []
    original = additions.model.refine_boxes

    def recording(model, layer_out, boxes):
        refined.append(original(model, layer_out, boxes))
        return refined[-1]

    monkeypatch.setattr(additions.model, "refine_boxes", recording)
    torch.manual_seed(0)
    once = tiny(anchor_queries=True).train()
    twice = tiny(anchor_queries=True, look_forward_twice=True).train()
    twice.load_state_dict(once.state_dict())
    images = torch.randn(1, 3, 64, 64)
    reaches = []
    for model in (once, twice):
        refined.clear()
        out = model(images)
        reaches.append(torch.autograd.grad(out["pred_boxes"].sum(), refined[-2])[0])
        boxes = out["pred_boxes"]
        if model is once:
            plain = boxes
    assert torch.allclose(boxes, plain, atol=1e-6)  # the values are the same ...
    assert not reaches[0].any() and reaches[1].abs().sum() > 0  # ... only the gradient's path is new


def test_contrastive_denoising_negatives_are_farther_and_say_no_object():
    """DINO §3.3: each group holds n positives then n negatives; the positives' noise stays within
    DN_BOX_NOISE, the negatives' lies between it and twice it; a group sees only itself; the negatives
    are trained to "no object" and have no box loss."""
    torch.manual_seed(0)
    model = tiny(anchor_queries=True, denoising_groups=20, dn_contrastive=True)
    targets = targets_of(4, 2)
    tgt, boxes, allowed = additions.model.add_denoising_queries(model, targets, torch.zeros(2, 5, 32),
                                                                torch.rand(2, 5, 4), None)
    n = additions.model.DN_MIN_SLOTS
    assert boxes.shape[1] == 5 + 20 * 2 * n
    noised = boxes[0, 5:].view(20, 2, n, 4)[:, :, :4]  # (groups, positive/negative, objects, 4)
    gt = targets[0]["boxes"]
    shift = (noised[..., :2] - gt[:, :2]).abs() / gt[:, 2:]  # of the side
    scale = (noised[..., 2:] / gt[:, 2:] - 1).abs()
    assert shift[:, 0].max() <= 0.2 + 1e-6 and scale[:, 0].max() <= 0.4 + 1e-6
    assert shift[:, 1].min() >= 0.2 - 1e-6 and shift[:, 1].max() <= 0.4 + 1e-6
    assert scale[:, 1].min() >= 0.4 - 1e-6 and scale[:, 1].max() <= 0.8 + 1e-6
    slot = torch.arange(20 * 2 * n)
    real = slot % n < 4  # the first image's 4 objects in each block of n slots
    group = slot[real] // (2 * n)
    seen = allowed[0, 0, 5:, 5:][real][:, real]
    assert torch.equal(seen, group[:, None] == group[None, :])  # positives and negatives of a group see each other
    # the loss: positives reconstruct, negatives say "no object" (no box loss whatever their boxes)
    for cls_loss in ("ce", "focal"):
        K = 3 + (cls_loss == "ce")
        criterion = AdditionsCriterion(train.SetCriterion(train.HungarianMatcher()), cls_loss=cls_loss)
        targets = targets_of(2)
        logits = torch.full((1, 1, 4, K), -12.0)  # one group: 2 slots of positives, 2 of negatives
        boxes = torch.rand(1, 1, 4, 4)
        logits[0, 0, [0, 1], targets[0]["labels"]] = 12.0
        boxes[0, 0, :2] = targets[0]["boxes"]
        if cls_loss == "ce":
            logits[0, 0, 2:, 3] = 12.0  # "no object"
        outputs = {"pred_logits": torch.zeros(1, 3, K), "pred_boxes": torch.rand(1, 3, 4),
                   "dn_outputs": {"pred_logits": logits, "pred_boxes": boxes, "groups": 1, "contrastive": True}}
        right = criterion(outputs, targets)
        assert right["loss_ce_dn"] < 1e-4 and right["loss_bbox_dn"] < 1e-6
        logits[0, 0, 2, 0] = 12.0  # a negative that claims class 0
        if cls_loss == "ce":
            logits[0, 0, 2, 3] = -12.0
        wrong = criterion(outputs, targets)
        assert wrong["loss_ce_dn"] > 1.0 and wrong["loss_bbox_dn"] < 1e-6


def test_successor_keys_need_their_base_additions():
    with pytest.raises(ValueError, match="look_forward_twice"):
        tiny(look_forward_twice=True)
    with pytest.raises(ValueError, match="dn_contrastive"):
        tiny(anchor_queries=True, dn_contrastive=True)
