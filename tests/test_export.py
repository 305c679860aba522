"""tools/export.py: the ONNX graph, run by onnxruntime, gives PyTorch's outputs at other batch sizes and
image sizes than it was traced with, padded or not."""

import pytest
import torch

from conftest import load_script
from detr import DETR

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def test_onnx_round_trip_matches_pytorch(tmp_path):
    export = load_script("tools/export.py")
    torch.manual_seed(0)
    model = DETR(num_classes=3, backbone="resnet18", hidden_dim=32, num_heads=4, num_encoder_layers=1,
                 num_decoder_layers=2, dim_feedforward=64, num_queries=5).eval()
    path = export.export(model, str(tmp_path / "tiny.onnx"), example_size=(96, 128))
    batches = export.check_inputs([(64, 160), (128, 96)], 32)
    batches.append((torch.randn(1, 3, 96, 64), torch.zeros(1, 96, 64, dtype=torch.bool)))  # batch 1, nothing padded
    assert batches[0][1].any() and not batches[2][1].any()
    logits, boxes = export.compare(model, path, batches)
    assert logits <= 1e-4 and boxes <= 1e-4
    # and the check would see a wrong graph: another model's outputs differ
    other = DETR(num_classes=3, backbone="resnet18", hidden_dim=32, num_heads=4, num_encoder_layers=1,
                 num_decoder_layers=2, dim_feedforward=64, num_queries=5).eval()
    assert max(export.compare(other, path, batches[:1])) > 1e-3
