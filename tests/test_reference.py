"""minidetr against a reference DETR: transformers' DetrForObjectDetection (a port of the official
model) with the same random weights gives the same outputs on a padded batch.

Needs the bench-only extras (pip install transformers timm); skipped without them, as in CI."""

import re

import pytest
import torch

from detr import DETR

transformers = pytest.importorskip("transformers")
pytest.importorskip("timm")


def hf_to_minidetr(state_dict):
    """transformers' DETR key names -> ours (q, k, v projections joined into one in_proj)."""
    ours = {}
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        for old, new in (("model.backbone.model.", "backbone."), ("model.query_position_embeddings.", "query_embed."),
                         ("model.input_projection.", "input_proj."), ("model.decoder.layernorm.", "decoder_norm."),
                         ("class_labels_classifier.", "class_head."), ("bbox_predictor.layers.", "box_head."),
                         (".encoder_attn_layer_norm.", ".norm2."), (".encoder_attn.", ".cross_attn."),
                         (".self_attn_layer_norm.", ".norm1."), (".mlp.fc1.", ".linear1."), (".mlp.fc2.", ".linear2."),
                         (".o_proj.", ".out_proj.")):
            key = key.replace(old, new)
        key = re.sub(r"model\.(encoder|decoder)\.layers\.", r"\1.", key)
        key = key.replace(".final_layer_norm.", ".norm2." if key.startswith("encoder") else ".norm3.")
        ours[key] = value
    for attn in [k[: -len(".q_proj.weight")] for k in ours if k.endswith(".q_proj.weight")]:
        for kind in ("weight", "bias"):
            ours[f"{attn}.in_proj_{kind}"] = torch.cat([ours.pop(f"{attn}.{p}_proj.{kind}") for p in "qkv"])
    return ours


def test_same_outputs_as_transformers_detr():
    torch.manual_seed(0)
    config = transformers.DetrConfig(num_labels=91, backbone="resnet50", use_pretrained_backbone=False)
    reference = transformers.DetrForObjectDetection(config).eval()
    state = reference.state_dict()
    for key, value in state.items():  # frozen BatchNorm statistics that are not the identity
        if "backbone" in key and key.endswith("running_var"):
            value.uniform_(0.5, 2.0)
        elif "backbone" in key and key.endswith("running_mean"):
            value.normal_(0, 0.1)
    reference.load_state_dict(state)
    model = DETR(91).eval()
    model.load_state_dict(hf_to_minidetr(state))
    images = torch.randn(2, 3, 480, 640)
    mask = torch.zeros(2, 480, 640, dtype=torch.bool)
    mask[1, 400:], mask[1, :, 500:] = True, True
    images[mask[:, None].expand_as(images)] = 0
    with torch.no_grad():
        ours = model(images, mask)
        theirs = reference(pixel_values=images, pixel_mask=(~mask).long())
    assert (ours["pred_logits"] - theirs.logits).abs().max() <= 1e-4
    assert (ours["pred_boxes"] - theirs.pred_boxes).abs().max() <= 1e-4
