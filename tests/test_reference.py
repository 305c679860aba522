"""minidetr against a reference DETR: transformers' DetrForObjectDetection (a port of the official
model) with the same random weights gives the same outputs on a padded batch, in both directions:
its save_pretrained folders (timm's and transformers' own ResNet, DC5) and its in-memory state dict
load here, and a folder written here loads there.

Needs the bench-only extras (pip install transformers timm); skipped without them, as in CI."""

import pytest
import torch

from lib import weights
from detr import DETR

transformers = pytest.importorskip("transformers")
pytest.importorskip("timm")


def padded_batch():
    images = torch.randn(2, 3, 480, 640)
    mask = torch.zeros(2, 480, 640, dtype=torch.bool)
    mask[1, 400:], mask[1, :, 500:] = True, True
    images[mask[:, None].expand_as(images)] = 0
    return images, mask


def assert_same_outputs(model, reference):
    images, mask = padded_batch()
    with torch.no_grad():
        ours = model.eval()(images, mask)
        theirs = reference.eval()(pixel_values=images, pixel_mask=(~mask).long())
    assert (ours["pred_logits"] - theirs.logits).abs().max() <= 1e-4
    assert (ours["pred_boxes"] - theirs.pred_boxes).abs().max() <= 1e-4


def with_batchnorm_statistics(state):
    """Frozen BatchNorm statistics that are not the identity, so that a misplaced one shows."""
    for key, value in state.items():
        if key.endswith("running_var"):
            value.uniform_(0.5, 2.0)
        elif key.endswith("running_mean"):
            value.normal_(0, 0.1)
    return state


CONFIGS = {
    "timm-r50": dict(backbone="resnet50", use_pretrained_backbone=False),
    "timm-r50-dc5": dict(backbone="resnet50", use_pretrained_backbone=False, dilation=True),
    "transformers-resnet50": dict(use_timm_backbone=False,
                                  backbone_config=transformers.ResNetConfig(out_features=["stage4"])),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_same_outputs_as_transformers_detr(tmp_path, name):
    torch.manual_seed(0)
    config = transformers.DetrConfig(num_labels=91, **CONFIGS[name])
    reference = transformers.DetrForObjectDetection(config).eval()
    reference.load_state_dict(with_batchnorm_statistics(reference.state_dict()))
    reference.save_pretrained(tmp_path)  # the on-disk names, as the hub's models have them
    model = weights.load_model(str(tmp_path))[0]
    assert model.config["dilation"] == name.endswith("dc5") and len(model.classes) == 91
    assert_same_outputs(model, reference)
    in_memory = DETR(**model.config)  # transformers 5's own state_dict() names
    weights.load_named_state_dict(in_memory, weights.hf_to_minidetr(reference.state_dict(), "state_dict"), "state_dict",
                                  "DetrForObjectDetection", weights.minidetr_to_hf_key)
    assert_same_outputs(in_memory, reference)


def test_a_folder_written_here_loads_in_transformers_with_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    model = DETR(num_classes=5, backbone="resnet50")
    model.load_state_dict(with_batchnorm_statistics(model.state_dict()))
    model.classes, model.category_ids = ["a", "b", "c", "d", "e"], [2, 4, 6, 8, 10]
    weights.write_transformers_folder(model, str(tmp_path))
    reference = transformers.DetrForObjectDetection.from_pretrained(str(tmp_path))
    assert reference.config.id2label[4] == "e" and reference.config.category_ids == [2, 4, 6, 8, 10]
    assert_same_outputs(model, reference)
    processor = transformers.AutoImageProcessor.from_pretrained(str(tmp_path))
    assert processor.size["shortest_edge"] == 800 and processor.size["longest_edge"] == 1333
