"""The model: exact parameter counts, official key mapping, attention, positions, padding, loading errors."""

import math

import pytest
import torch
import torchvision
from torch import nn

import detr
from lib import weights
from detr import DETR, Backbone
from lib.weights import LoadError
from additions.model import AdditionsDETR, finer_backbone

DATA = __import__("pathlib").Path(__file__).parent / "data"


def tiny_detr(**kwargs):
    args = dict(num_classes=3, backbone="resnet18", hidden_dim=32, num_heads=4, num_encoder_layers=2,
                num_decoder_layers=2, dim_feedforward=64, num_queries=5)
    return DETR(**{**args, **kwargs})


def official_keys():
    rows = [line.split("\t") for line in (DATA / "detr_r50_official_keys.tsv").read_text().splitlines()[1:]]
    return {key: tuple(int(n) for n in shape.split("x")) for key, shape in rows}


@pytest.fixture(scope="module")
def detr_r50():
    return DETR(num_classes=91)


def test_detr_r50_counts_match_the_reference(detr_r50):
    assert sum(p.numel() for p in detr_r50.parameters()) == 41_524_768
    assert sum(p.numel() for p in detr_r50.parameters() if p.requires_grad) == 41_302_368
    assert len(detr_r50.state_dict()) == 458
    # frozen: the stem and layer1, nothing else
    frozen = {n.split(".")[1] for n, p in detr_r50.named_parameters() if not p.requires_grad}
    assert frozen == {"conv1", "layer1"}


def test_official_keys_and_shapes_map_exactly(detr_r50):
    ours = {weights.minidetr_to_official_key(k): tuple(v.shape) for k, v in detr_r50.state_dict().items()}
    assert ours == official_keys()
    for key in detr_r50.state_dict():
        assert weights.official_to_minidetr_key(weights.minidetr_to_official_key(key)) == key
    assert weights.official_to_minidetr_key("transformer.decoder.layers.3.multihead_attn.out_proj.weight") == \
        "decoder.3.cross_attn.out_proj.weight"
    assert weights.official_to_minidetr_key("backbone.0.body.layer4.2.bn3.running_var") == \
        "backbone.layer4.2.bn3.running_var"


def test_official_r50_checkpoint_round_trip(detr_r50, tmp_path, monkeypatch):
    sd = {weights.minidetr_to_official_key(k): v for k, v in detr_r50.state_dict().items()}
    sd["backbone.0.body.bn1.num_batches_tracked"] = torch.tensor(0)  # plain BatchNorm leftovers are ignored
    torch.save({"model": sd}, tmp_path / "detr.pth")
    loaded = weights.load_model(str(tmp_path / "detr.pth"))[0]
    assert loaded.num_classes == 91 and loaded.num_queries == 100
    for key, value in detr_r50.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key

    reads, real_read = [], weights.load_checkpoint_file
    monkeypatch.setattr(weights, "load_checkpoint_file", lambda path: reads.append(path) or real_read(path))
    # as sample.py and tools/export.py load: the file read once
    model, sizes = weights.load_model(str(tmp_path / "detr.pth"))
    assert len(reads) == 1 and model.classes == weights.COCO_CLASSES and sizes == {"val_scale": 800, "max_size": 1333}


def test_round_trip_reproduces_outputs(tmp_path):
    torch.manual_seed(0)
    model = tiny_detr().eval()
    sd = {weights.minidetr_to_official_key(k): v for k, v in model.state_dict().items()}
    torch.save({"model": sd, "args": "ignored"}, tmp_path / "tiny.pth")
    loaded = weights.load_model(str(tmp_path / "tiny.pth"), num_heads=4)[0].eval()
    x = torch.randn(2, 3, 64, 96)
    a, b = model(x), loaded(x)
    assert torch.equal(a["pred_logits"], b["pred_logits"]) and torch.equal(a["pred_boxes"], b["pred_boxes"])


@pytest.mark.parametrize("corrupt, message", [
    (lambda sd: sd.update({"class_embed.bias": torch.zeros(7)}),
     "key 'class_embed.bias' has shape (7,), expected (4,)"),
    (lambda sd: sd.update({"transformer.encoder.layers.0.extra.weight": torch.zeros(1)}),
     "unexpected key 'transformer.encoder.layers.0.extra.weight'"),
    (lambda sd: sd.pop("transformer.decoder.norm.bias"), "missing key 'transformer.decoder.norm.bias'"),
    (lambda sd: sd.pop("query_embed.weight"), "not an official DETR checkpoint"),
])
def test_bad_checkpoints_fail_with_one_line_naming_the_key(tmp_path, corrupt, message):
    model = tiny_detr()
    sd = {weights.minidetr_to_official_key(k): v for k, v in model.state_dict().items()}
    corrupt(sd)
    torch.save({"model": sd}, tmp_path / "bad.pth")
    with pytest.raises(LoadError) as e:
        weights.load_model(str(tmp_path / "bad.pth"), num_heads=4)[0]
    assert message in str(e.value) and "\n" not in str(e.value)


def test_not_a_checkpoint_and_missing_file(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"this is not a checkpoint\n" * 10)
    with pytest.raises(LoadError, match="not a PyTorch checkpoint") as e:
        weights.load_model(str(tmp_path / "junk.pth"))[0]
    assert "\n" not in str(e.value)
    with pytest.raises(LoadError, match="no checkpoint file at"):
        weights.load_model(str(tmp_path / "nowhere.pth"))[0]


def test_pretrained_backbone_offline_is_one_clear_line(monkeypatch, tmp_path):
    def offline(self, *args, **kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(LoadError) as e:
        weights.load_imagenet_backbone(DETR(num_classes=3, backbone="resnet18"))
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "checkpoints" / "resnet18-f37072fd.pth") in msg
    assert "pretrained_backbone=False" in msg


@pytest.mark.parametrize("feature_stride", [32, 8])
def test_imagenet_weights_load_into_every_stage_the_backbone_keeps(monkeypatch, feature_stride):
    """weights.load_imagenet_backbone gives the backbone torchvision's tensors (here a random ResNet's, as the
    download would): every stage it keeps, frozen BatchNorm statistics included; the classifier is left out."""
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18()
    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", lambda self, *a, **k: resnet.state_dict())
    model = AdditionsDETR(num_classes=3, backbone="resnet18", feature_stride=feature_stride, num_encoder_layers=1,
                          num_decoder_layers=1)
    weights.load_imagenet_backbone(model)
    kept = model.backbone.state_dict()
    assert kept.keys() <= resnet.state_dict().keys() and (
        "backbone.layer4.0.conv1.weight" in model.state_dict()) == (feature_stride == 32)
    assert all(torch.equal(v, resnet.state_dict()[k]) for k, v in kept.items())


def test_attention_equals_multihead_attention():
    torch.manual_seed(0)
    dim, heads, B, S = 32, 4, 2, 7
    mha = nn.MultiheadAttention(dim, heads, batch_first=True).eval()
    ours = detr.Attention(dim, heads, dropout=0.0).eval()
    ours.load_state_dict(mha.state_dict())
    x, pos = torch.randn(B, S, dim), torch.randn(B, S, dim)
    mask = torch.zeros(B, S, dtype=torch.bool)
    mask[0, 5:] = True  # the first sequence has two padded keys
    expected, expected_w = mha(x + pos, x + pos, x, key_padding_mask=mask, average_attn_weights=False)
    out, _ = ours(x + pos, x + pos, x, key_padding_mask=mask)
    out_w, weights = ours(x + pos, x + pos, x, key_padding_mask=mask, need_weights=True)
    assert (out - expected).abs().max() <= 1e-5
    assert (out_w - expected).abs().max() <= 1e-5 and (weights - expected_w).abs().max() <= 1e-6
    assert weights[0, :, :, 5:].abs().max() == 0  # padded keys get no attention


def test_sine_positions_hand_computed():
    mask = torch.zeros(1, 3, 4, dtype=torch.bool)
    pos = detr.sine_pos_embed(mask, dim=8)  # 4 channels for y, 4 for x; frequencies 1, 1, 100, 100
    assert pos.shape == (1, 3, 4, 8)
    for (r, c) in [(0, 0), (2, 1)]:
        y = (r + 1) / (3 + 1e-6) * 2 * math.pi
        x = (c + 1) / (4 + 1e-6) * 2 * math.pi
        expected = [math.sin(y), math.cos(y), math.sin(y / 100), math.cos(y / 100),
                    math.sin(x), math.cos(x), math.sin(x / 100), math.cos(x / 100)]
        assert torch.allclose(pos[0, r, c], torch.tensor(expected), atol=1e-6)


def test_padding_does_not_move_positions():
    mask = torch.zeros(1, 5, 6, dtype=torch.bool)
    padded = torch.ones(1, 9, 11, dtype=torch.bool)
    padded[:, :5, :6] = False
    a = detr.sine_pos_embed(mask)
    b = detr.sine_pos_embed(padded)
    assert torch.equal(a[0], b[0, :5, :6])


class Patchify(nn.Module):
    """A backbone whose features of the real image cannot see the padding (stride = kernel = 32),
    so that any difference would come from the masks, positions or attention."""
    num_channels = 16

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, kernel_size=32, stride=32)

    def forward(self, x):
        return self.conv(x)


def test_padded_batch_equals_image_alone():
    torch.manual_seed(0)
    model = tiny_detr().eval()
    model.backbone = Patchify()
    model.input_proj = nn.Conv2d(16, 32, 1)
    small, big = torch.randn(3, 64, 96), torch.randn(3, 128, 160)
    images = torch.zeros(2, 3, 128, 160)
    images[0, :, :64, :96], images[1] = small, big
    mask = torch.ones(2, 128, 160, dtype=torch.bool)
    mask[0, :64, :96] = False
    mask[1] = False
    batch = model(images, mask)
    alone = model(small[None])
    for key in ("pred_logits", "pred_boxes"):
        assert (batch[key][0] - alone[key][0]).abs().max() <= 1e-4
        assert (batch["aux_outputs"][0][key][0] - alone["aux_outputs"][0][key][0]).abs().max() <= 1e-4
    # and the padding changes nothing for the full-size image either
    assert (batch["pred_logits"][1] - model(big[None])["pred_logits"][0]).abs().max() <= 1e-4


def test_output_shapes_and_postprocess():
    torch.manual_seed(0)
    model = tiny_detr().eval()
    out = model(torch.randn(2, 3, 64, 64), need_weights=True)
    assert out["pred_logits"].shape == (2, 5, 4) and out["pred_boxes"].shape == (2, 5, 4)
    assert len(out["aux_outputs"]) == 1
    assert out["dec_attn"][-1].shape == (2, 4, 5, 4)  # (B, heads, Q, h*w) with a 2x2 feature map
    assert torch.allclose(out["dec_attn"][-1].sum(-1), torch.ones(2, 4, 5))
    out = {"pred_logits": torch.tensor([[[0.0, 5.0, 0.0, 0.0], [0.0, 0.0, 0.0, 9.0]]]),
           "pred_boxes": torch.tensor([[[0.5, 0.5, 0.5, 0.25], [0.1, 0.1, 0.1, 0.1]]])}
    (result,) = model.postprocess(out, torch.tensor([[100, 200]]))
    assert result["labels"].tolist() == [1, 0]
    assert result["boxes"][0].tolist() == [50.0, 37.5, 150.0, 62.5]
    assert result["scores"][0] == pytest.approx(math.exp(5) / (math.exp(5) + 3))


def test_a_stage_that_does_not_learn_keeps_its_batchnorm_statistics():
    """With a trained BatchNorm (frozen_bn=False), lr_backbone=0 (trainable_layers=0) must freeze the
    statistics too, not only the weights; a learning stage updates them."""
    backbone = Backbone("resnet18", frozen_bn=False, trainable_layers=1).train()
    before = {n: b.clone() for n, b in backbone.named_buffers() if n.endswith("running_mean")}
    backbone(torch.randn(2, 3, 64, 64))
    changed = {n.split(".")[0] for n, b in backbone.named_buffers() if n in before and not torch.equal(b, before[n])}
    assert changed == {"layer4"}


@pytest.mark.parametrize("feature_stride, trainable_layers, learning", [
    (32, 3, {"layer2", "layer3", "layer4"}),  # the paper: the stem and layer1 frozen
    (32, 5, {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4"}),
    (16, 3, {"layer1", "layer2", "layer3"}),  # counted over the stages that exist: layer4 is gone
    (8, 3, {"conv1", "bn1", "layer1", "layer2"}),
    (16, 0, set()),
])
def test_trainable_layers_count_from_the_top_over_the_stages_that_exist(feature_stride, trainable_layers, learning):
    backbone = (Backbone("resnet18", frozen_bn=False, trainable_layers=trainable_layers) if feature_stride == 32
                else finer_backbone("resnet18", trainable_layers, False, feature_stride))
    assert {n.split(".")[0] for n, p in backbone.named_parameters() if p.requires_grad} == learning
