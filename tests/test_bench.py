"""tools/bench.py on a tiny config: well-formed JSON, and a FLOP count that matches a hand count."""

import json
import sys

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
    bench = tiny(load_script("tools/bench.py"))
    bench.main()
    (line,) = capsys.readouterr().out.strip().splitlines()
    result = json.loads(line)
    assert set(result) == {"impl", "setting", "device", "torch", "batch_size", "image_size", "train_img_per_s",
                           "infer_img_per_s", "peak_memory_gib", "train_gflops_per_img", "mfu", "train_img_per_s_range",
                           "infer_img_per_s_range"}
    assert result["impl"] == "minidetr" and result["setting"] == "fp32-eager" and result["image_size"] == [64, 96]
    assert result["train_img_per_s"] > 0 and result["infer_img_per_s"] > 0 and result["train_gflops_per_img"] > 0
    assert result["mfu"] is None and result["peak_memory_gib"] is None  # CPU: no peak given, no GPU memory


def test_transformer_flops_match_a_hand_count():
    bench = tiny(load_script("tools/bench.py"))
    model = bench.MiniDETR().model.eval()
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


def test_step_memory_holds_at_least_weights_gradients_and_adam_state(monkeypatch):
    """In a fresh process, as tools/bench.py --what=memory measures it: the peak is at least the fp32
    weights, gradients and AdamW's two moments of the trainable parameters."""
    import multiprocessing

    from tools import bench

    settings = {"batch_size": 1, "height": 320, "width": 352, "additions": True, "backbone": "resnet18",
                "channels_last": False}
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        gib = pool.apply(bench.step_memory, (settings, "fp32"))
    for key, value in settings.items():
        monkeypatch.setattr(bench, key, value)
    model = bench.MiniDETR(with_additions=True).model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert model.encoder_proposals and 16 * trainable / 2**30 <= gib < 4


def test_gpu_check_writes_its_json_and_the_readme_rows(tmp_path, capsys, monkeypatch):
    """The one GPU command, on a tiny model for a few seconds (compiling is tested in test_gpu_ready.py:
    inductor would take minutes here)."""
    bench = tiny(load_script("tools/bench.py"))
    bench.duration, bench.repeats = 2.0, 2
    monkeypatch.setattr(bench, "compile_model", lambda model: None)
    monkeypatch.setitem(sys.modules, "transformers", None)  # as in CI: Hugging Face's DETR is skipped
    path = tmp_path / "gpu_check.json"
    bench.gpu_check(str(path))
    speed, run = json.loads(path.read_text())
    low, high = speed["train_img_per_s_range"]
    assert speed["impl"] == "minidetr" and low <= speed["train_img_per_s"] <= high and "train_times" not in speed
    # host syncs: counted on CUDA only
    assert run["steps"] >= 1 and run["train_img_per_s"] > 0 and run["host_syncs_per_step"] is None
    rows = capsys.readouterr().out.strip().splitlines()
    assert len(rows) == 2 and all(row.startswith("| cpu | ") and row.endswith(" |") for row in rows)
