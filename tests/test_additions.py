"""The additions beyond the paper (detr.py): each one's mechanism, and that with all of them off the
model is exactly the paper's DETR."""

import pytest
import torch

import detr
import train
from detr import DETR


def tiny(**kwargs):
    args = dict(num_classes=3, backbone="resnet18", hidden_dim=32, num_heads=4, num_encoder_layers=1,
                num_decoder_layers=3, dim_feedforward=64, num_queries=5, dropout=0.0, feature_stride=8)
    return DETR(**{**args, **kwargs})


def targets_of(*counts, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"labels": torch.randint(0, 3, (n,), generator=g),
             "boxes": torch.cat([torch.rand(n, 2, generator=g) * 0.6 + 0.2, torch.rand(n, 2, generator=g) * 0.3 + 0.1], 1)}
            for n in counts]


def test_all_off_is_the_paper_model():
    torch.manual_seed(0)
    model = tiny(feature_stride=32)
    assert not any(k.startswith(("anchor", "box_pos", "proposal", "label_embed")) for k in model.state_dict())
    assert set(detr.parts(model)) == {"backbone", "input_proj", "encoder", "decoder", "query_embed", "class_head", "box_head"}
    model.train()  # without additions, training mode (dropout 0) changes nothing and no extra outputs appear
    out = model(torch.randn(2, 3, 64, 64), targets=targets_of(1, 2))
    assert set(out) == {"pred_logits", "pred_boxes", "aux_outputs"} and out["pred_logits"].shape == (2, 5, 4)


@pytest.mark.parametrize("stride, tokens, channels", [(32, 2 * 2, 512), (16, 4 * 4, 256), (8, 8 * 8, 128)])
def test_feature_stride_gives_a_finer_grid(stride, tokens, channels):
    model = tiny(feature_stride=stride).eval()
    assert model.backbone.num_channels == channels
    assert hasattr(model.backbone, "layer4") == (stride == 32) and hasattr(model.backbone, "layer3") == (stride >= 16)
    out = model(torch.randn(1, 3, 64, 64), need_weights=True)
    assert out["dec_attn"][0].shape[-1] == tokens
    with pytest.raises(ValueError, match="feature_stride"):
        tiny(feature_stride=4)
    r50 = DETR(3, backbone="resnet50", feature_stride=16, num_encoder_layers=1, num_decoder_layers=1)
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
        tiny(anchor_queries=True, encoder_proposals=True, num_queries=10, feature_stride=32).eval()(torch.randn(1, 3, 64, 64))


def test_encoder_proposals_are_matched_and_padding_never_is():
    criterion = train.SetCriterion(3, train.HungarianMatcher())
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


def noiseless(monkeypatch):
    monkeypatch.setattr(detr, "DN_BOX_NOISE", 0.0)
    monkeypatch.setattr(detr, "DN_LABEL_NOISE", 0.0)


def test_real_queries_cannot_see_denoising_queries(monkeypatch):
    torch.manual_seed(0)
    model = tiny(anchor_queries=True, denoising_groups=2).train()  # dropout 0: training mode is deterministic
    images = torch.randn(2, 3, 64, 64)
    plain = model(images)
    for seed in (1, 2):  # whatever the denoising queries hold, the real queries' outputs stay the same
        out = model(images, targets=targets_of(3, 1, seed=seed))
        assert out["dn_outputs"]["pred_logits"].shape == (3, 2, 2 * 3, 4)  # (layers, B, groups * most objects, K+1)
        assert torch.allclose(out["pred_logits"], plain["pred_logits"], atol=1e-6)
        assert torch.allclose(out["pred_boxes"], plain["pred_boxes"], atol=1e-6)
    # denoising groups cannot see each other either: without noise each group alone gives the same outputs
    noiseless(monkeypatch)
    out = model(images, targets=targets_of(3, 1))["dn_outputs"]
    model.denoising_groups = 1
    one = model(images, targets=targets_of(3, 1))["dn_outputs"]
    for g in range(2):
        assert torch.allclose(out["pred_boxes"][:, :, g * 3 : g * 3 + 3], one["pred_boxes"], atol=1e-6)
    # and the padded query (the second image has 1 object of 3 slots) is seen by nobody
    out2 = model(images, targets=[targets_of(3, 1)[0], targets_of(3, 1, seed=5)[1]])["dn_outputs"]
    assert torch.allclose(out2["pred_boxes"][:, 0], one["pred_boxes"][:, 0], atol=1e-6)


def test_denoising_noise_stays_within_the_paper_bounds():
    torch.manual_seed(0)
    model = tiny(anchor_queries=True, denoising_groups=50)
    targets = targets_of(4, 2)
    tgt, boxes, allowed = detr.add_denoising_queries(model, targets, torch.zeros(2, 5, 32), torch.rand(2, 5, 4), None)
    noised = boxes[0, 5:].view(50, 4, 4)  # (groups, objects, 4)
    gt = targets[0]["boxes"]
    shift = (noised[..., :2] - gt[:, :2]).abs() / gt[:, 2:]
    scale = (noised[..., 2:] / gt[:, 2:] - 1).abs()
    assert shift.max() <= 0.2 + 1e-6 and scale.max() <= 0.4 + 1e-6 and shift.max() > 0.15 and scale.max() > 0.3
    swapped = (tgt[0, 5:].view(50, 4, -1) != model.label_embed(targets[0]["labels"])).any(-1).float().mean()
    assert 0.05 < swapped < 0.25  # labels are swapped with probability 0.2 (sometimes for the same label)
    assert allowed.shape == (2, 1, 5 + 200, 5 + 200)
    assert not allowed[:, 0, :5, 5:].any() and allowed[:, 0, 5:, :5].all()


def test_denoising_loss_needs_no_matching():
    criterion = train.SetCriterion(3, train.HungarianMatcher())
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
    logits[0, 1, [1, 3], 3] = 20.0  # the padding says "no object"
    outputs = {"pred_logits": torch.zeros(2, 3, 4), "pred_boxes": torch.rand(2, 3, 4),
               "dn_outputs": {"pred_logits": logits, "pred_boxes": boxes, "groups": 2}}
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
    (pred, tgt), = matcher({"pred_logits": two[0], "pred_boxes": two[1]}, targets, groups=2)
    assert sorted(tgt.tolist()) == [0, 0, 1, 1, 2, 2]  # every object once in each group
    (p1, t1), = single
    assert pred.tolist() == p1.tolist() + (p1 + 4).tolist() and tgt.tolist() == t1.tolist() * 2
    # identical groups: the groups' losses are averaged, so the loss is the single group's
    criterion = train.SetCriterion(3, matcher, query_groups=2)
    one = train.SetCriterion(3, matcher)({"pred_logits": logits, "pred_boxes": boxes}, targets)
    both = criterion({"pred_logits": two[0], "pred_boxes": two[1]}, targets)
    for key in ("loss", "loss_ce", "loss_bbox", "loss_giou"):
        assert both[key].item() == pytest.approx(one[key].item(), rel=1e-6)


def test_additions_need_box_queries():
    for kwargs in (dict(encoder_proposals=True), dict(denoising_groups=2)):
        with pytest.raises(ValueError, match="need anchor_queries=True"):
            tiny(**kwargs)


def test_diagnostics_see_alike_queries():
    torch.manual_seed(0)
    model = tiny(anchor_queries=True)
    out = model(torch.randn(2, 3, 64, 64))
    out["pred_logits"].sum().backward()
    record = train.training_diagnostics(model, out)
    params = detr.parts(model)["class_head"]
    assert record["grad_norm_class_head"] == pytest.approx(torch.cat([p.grad.flatten() for p in params]).norm().item(), rel=1e-5)
    assert record["weight_norm_anchors"] > 0 and record["grad_norm_backbone"] > 0
    same = {"pred_logits": torch.tensor([[[0.0, 1, 0, 0]] * 5] * 2), "pred_boxes": torch.full((2, 5, 4), 0.5)}
    record = train.training_diagnostics(model, same)
    assert record["query_classes"] == 1 and record["query_box_spread"] == 0
    apart = {"pred_logits": torch.eye(4)[[0, 1, 2, 3, 3]][None], "pred_boxes": torch.tensor([[[0.1, 0.5, 0.1, 0.1], [0.9, 0.5, 0.1, 0.1]] + [[0.5, 0.5, 0.1, 0.1]] * 3])}
    record = train.training_diagnostics(model, apart)
    assert record["query_classes"] == 4 and record["query_box_spread"] == pytest.approx((0.32 / 5) ** 0.5, rel=1e-5)
