"""bench.py on a tiny config: well-formed JSON, and a FLOP count that matches a hand count."""

import json

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from conftest import load_script


def tiny(bench):
    bench.device, bench.batch_size, bench.height, bench.width = "cpu", 2, 64, 96
    bench.backbone, bench.hidden_dim, bench.num_encoder_layers, bench.num_decoder_layers = "resnet18", 32, 1, 2
    bench.dim_feedforward, bench.num_queries, bench.num_classes = 64, 5, 3
    bench.warmup, bench.iters, bench.settings = 1, 1, "fp32-eager"
    return bench


def test_bench_prints_one_well_formed_line(capsys):
    bench = tiny(load_script("bench.py"))
    bench.main()
    (line,) = capsys.readouterr().out.strip().splitlines()
    result = json.loads(line)
    assert set(result) == {"impl", "setting", "device", "torch", "batch_size", "image_size", "train_img_per_s",
                           "infer_img_per_s", "peak_memory_gib", "train_gflops_per_img", "mfu"}
    assert result["impl"] == "minidetr" and result["setting"] == "fp32-eager" and result["image_size"] == [64, 96]
    assert result["train_img_per_s"] > 0 and result["infer_img_per_s"] > 0 and result["train_gflops_per_img"] > 0
    assert result["mfu"] is None and result["peak_memory_gib"] is None  # CPU: no peak given, no GPU memory


def test_transformer_flops_match_a_hand_count():
    bench = tiny(load_script("bench.py"))
    model = bench.MiniDETR(compiled=False).model.eval()
    B, C, F, Q = 2, 32, 64, 5
    S = (64 // 32) * (96 // 32)  # tokens of the feature map
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(torch.randn(B, 3, 64, 96))
    counts = counter.get_flop_counts()
    encoder = sum(counts["DETR.encoder.0"].values())
    decoder = sum(counts["DETR.decoder.0"].values()) + sum(counts["DETR.decoder.1"].values())
    matmul = lambda m, k, n: 2 * m * k * n  # noqa: E731 - a multiply-add is 2 FLOPs
    # encoder layer: q, k, v and output projections, scores and weighted sum, two FFN matmuls
    hand_encoder = B * (4 * matmul(S, C, C) + 2 * matmul(S, C, S) + matmul(S, C, F) + matmul(S, F, C))
    # decoder layer: self-attention over Q queries, cross-attention over S tokens, FFN
    hand_decoder = B * (4 * matmul(Q, C, C) + 2 * matmul(Q, C, Q)
                        + 2 * matmul(Q, C, C) + 2 * matmul(S, C, C) + 2 * matmul(Q, C, S)
                        + matmul(Q, C, F) + matmul(Q, F, C))
    assert abs(encoder - hand_encoder) <= 0.01 * hand_encoder
    assert abs(decoder - 2 * hand_decoder) <= 0.01 * 2 * hand_decoder
