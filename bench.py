"""
How fast is DETR here: training-step and inference images/s, peak GPU memory and model FLOPs
utilisation (MFU), on random input so that no data is needed. One JSON line per setting.

    python bench.py                          # DETR-R50, 91 classes: GPU batch 8 at 800x1066, CPU batch 2 at 512x512
    python bench.py --compare=hf             # the same for Hugging Face's DetrForObjectDetection, and the ratios
    python bench.py --settings=bf16-compile --profile    # a Chrome trace of one training step, and its top ops
    python bench.py --what=map               # compute_map on 5,000 images x 100 detections

A training step is forward + Hungarian matching + loss + backward + AdamW step; inference is
forward + postprocess. FLOPs are counted once per setting with torch.utils.flop_counter (attention
through SDPA's math path, so its matmuls are counted), and MFU divides them by the step time and
the device's peak dense bf16 TFLOPS (--peak_tflops; no default on CPU, so MFU is null there).
"""

import json
import sys
import time
from contextlib import nullcontext

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import train
from detr import DETR, postprocess

# defaults, each overridable as --key=value
on_gpu = torch.cuda.is_available()
device = "cuda" if on_gpu else "cpu"
batch_size = 8 if on_gpu else 2
height, width = (800, 1066) if on_gpu else (512, 512)
backbone = "resnet50"
num_classes = 91
hidden_dim = 256
num_encoder_layers = 6
num_decoder_layers = 6
dim_feedforward = 2048
num_queries = 100
settings = "fp32-eager,bf16-eager,bf16-compile" if on_gpu else "fp32-eager"  # <dtype>-<eager|compile>
channels_last = True  # the backbone's convolutions in NHWC, faster on tensor cores and in oneDNN
warmup = 5 if on_gpu else 2
iters = 20 if on_gpu else 5
compare = ""  # 'hf': also measure transformers' DetrForObjectDetection
peak_tflops = 0.0  # the device's dense bf16 peak; 0: looked up from the GPU's name
profile = False  # write trace.json for one training step of the first setting
what = "speed"  # 'speed', or 'map' for the compute_map timing

PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.1, "A10": 125.0, "4090": 165.2}


def device_peak():
    if peak_tflops:
        return peak_tflops * 1e12
    if device == "cuda":
        name = torch.cuda.get_device_name()
        for key, tflops in PEAK_BF16_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return None


def random_batch(generator):
    """Images padded to one size (the second is 3/4 as tall, so the mask matters), 1-20 boxes each."""
    images = torch.randn(batch_size, 3, height, width, generator=generator)
    mask = torch.zeros(batch_size, height, width, dtype=torch.bool)
    if batch_size > 1:
        mask[1, height * 3 // 4 :] = True
        images[1, :, height * 3 // 4 :] = 0
    targets = []
    for _ in range(batch_size):
        n = int(torch.randint(1, 21, (), generator=generator))
        centres, sizes = torch.rand(n, 2, generator=generator) * 0.6 + 0.2, torch.rand(n, 2, generator=generator) * 0.3 + 0.05
        targets.append({"labels": torch.randint(0, num_classes, (n,), generator=generator), "boxes": torch.cat([centres, sizes], 1)})
    return images, mask, targets


def make_optimizer(model):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4, fused=device == "cuda")


def backward_and_step(loss, model, optimizer):
    """The rest of a training step, the same for both implementations (gradients clipped at 0.1)."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class MiniDETR:
    """minidetr's model, loss and optimizer behind the two calls the benchmark times."""

    name = "minidetr"

    def __init__(self, compiled):
        self.model = DETR(num_classes, backbone=backbone, hidden_dim=hidden_dim, num_encoder_layers=num_encoder_layers,
                          num_decoder_layers=num_decoder_layers, dim_feedforward=dim_feedforward,
                          num_queries=num_queries).to(device)
        if channels_last:
            self.model.backbone.to(memory_format=torch.channels_last)
        self.criterion = train.SetCriterion(num_classes, train.HungarianMatcher()).to(device)
        self.optimizer = make_optimizer(self.model)
        self.forward = torch.compile(self.model) if compiled else self.model

    def train_step(self, images, mask, targets, autocast):
        with autocast:
            outputs = self.forward(images, mask)
        backward_and_step(self.criterion(outputs, targets)["loss"], self.model, self.optimizer)

    def infer(self, images, mask, autocast):
        with torch.no_grad(), autocast:
            return postprocess(self.forward(images, mask), [(height, width)] * len(images))


class HFDETR:
    """transformers' DetrForObjectDetection with the same sizes, random weights, its own loss."""

    name = "hf"

    def __init__(self, compiled):
        try:
            from transformers import DetrConfig, DetrForObjectDetection
        except ImportError:
            raise SystemExit("error: --compare=hf needs transformers and timm: pip install transformers timm") from None
        config = DetrConfig(num_labels=num_classes, num_queries=num_queries, d_model=hidden_dim,
                            encoder_layers=num_encoder_layers, decoder_layers=num_decoder_layers,
                            encoder_ffn_dim=dim_feedforward, decoder_ffn_dim=dim_feedforward, auxiliary_loss=True,
                            attention_dropout=0.1, activation_dropout=0.1, backbone=backbone, use_pretrained_backbone=False)
        self.model = DetrForObjectDetection(config).to(device).train()
        for name, p in self.model.named_parameters():  # the same frozen stem and layer1 as the paper (and minidetr)
            if "backbone" in name and not any(f"layer{i}." in name for i in (2, 3, 4)):
                p.requires_grad_(False)
        self.optimizer = make_optimizer(self.model)
        self.forward = torch.compile(self.model) if compiled else self.model

    def train_step(self, images, mask, targets, autocast):
        labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
        with autocast:
            loss = self.forward(pixel_values=images, pixel_mask=(~mask).long(), labels=labels).loss
        backward_and_step(loss, self.model, self.optimizer)

    def infer(self, images, mask, autocast):
        with torch.no_grad(), autocast:
            out = self.forward(pixel_values=images, pixel_mask=(~mask).long())
            return postprocess({"pred_logits": out.logits, "pred_boxes": out.pred_boxes}, [(height, width)] * len(images))


def synchronize():
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, n):
    synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    synchronize()
    return (time.perf_counter() - t) / n


def measure(impl_class, setting):
    dtype, mode = setting.split("-")
    torch.manual_seed(0)
    impl = impl_class(compiled=mode == "compile")
    images, mask, targets = random_batch(torch.Generator().manual_seed(0))
    images, mask = images.to(device), mask.to(device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    autocast = nullcontext() if dtype == "fp32" else torch.autocast(device, dtype=torch.bfloat16)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    # FLOPs of one training step, counted once, eager (SDPA's math path, which the counter sees through)
    compiled, impl.forward = impl.forward, impl.model
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        impl.train_step(images, mask, targets, autocast)
    step_flops = counter.get_total_flops()
    impl.forward = compiled

    def train_step():
        impl.train_step(images, mask, targets, autocast)

    def infer():
        impl.infer(images, mask, autocast)

    timed(train_step, warmup)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step_time = timed(train_step, iters)
    peak_memory = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    if profile and impl_class is MiniDETR:
        write_profile(train_step)
    impl.model.eval()
    timed(infer, warmup)
    infer_time = timed(infer, iters)
    peak = device_peak()
    return {
        "impl": impl.name, "setting": setting, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__, "batch_size": batch_size, "image_size": [height, width],
        "train_img_per_s": round(batch_size / step_time, 3), "infer_img_per_s": round(batch_size / infer_time, 3),
        "peak_memory_gib": None if peak_memory is None else round(peak_memory, 2),
        "train_gflops_per_img": round(step_flops / batch_size / 1e9, 1),
        "mfu": None if peak is None else round(step_flops / step_time / peak, 4),
    }


def write_profile(train_step, path="trace.json"):
    from torch.profiler import ProfilerActivity, profile as profiler

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profiler(activities=activities) as prof:
        train_step()
        synchronize()
    prof.export_chrome_trace(path)
    sort_by = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort_by, row_limit=12), file=sys.stderr)
    print(f"trace of one training step -> {path}", file=sys.stderr)


def bench_map():
    """compute_map on 5,000 images x 100 detections (20 classes, 1-7 objects an image, jittered boxes)."""
    g = torch.Generator().manual_seed(0)
    detections, ground_truths = [], []
    for _ in range(5000):
        n = int(torch.randint(1, 8, (), generator=g))
        xy, wh = torch.rand(n, 2, generator=g) * 400, torch.rand(n, 2, generator=g) * 200 + 10
        boxes, labels = torch.cat([xy, xy + wh], 1), torch.randint(0, 20, (n,), generator=g)
        ground_truths.append({"boxes": boxes, "labels": labels, "difficult": torch.rand(n, generator=g) < 0.1})
        source = torch.randint(0, n, (100,), generator=g)
        jittered = boxes[source] + torch.randn(100, 4, generator=g) * 10
        jittered[:, 2:] = torch.maximum(jittered[:, 2:], jittered[:, :2] + 1)
        other = torch.randint(0, 20, (100,), generator=g)
        detections.append({"boxes": jittered, "scores": torch.rand(100, generator=g),
                           "labels": torch.where(torch.rand(100, generator=g) < 0.5, labels[source], other)})
    t = time.perf_counter()
    metrics = train.compute_map(detections, ground_truths, 20)
    seconds = time.perf_counter() - t
    print(json.dumps({"what": "compute_map", "images": 5000, "detections_per_image": 100, "seconds": round(seconds, 2),
                      **{k: round(v, 4) for k, v in metrics.items() if k != "AP_per_class"}}))


def main():
    if what == "map":
        return bench_map()
    impls = [MiniDETR] + ([HFDETR] if compare == "hf" else [])
    for setting in settings.split(","):
        results = [measure(impl, setting) for impl in impls]
        for r in results:
            print(json.dumps(r))
        if len(results) == 2:
            ours, theirs = results
            ratios = {k: round(ours[k] / theirs[k], 2) for k in ("train_img_per_s", "infer_img_per_s")}
            if ours["peak_memory_gib"]:
                ratios["peak_memory"] = round(ours["peak_memory_gib"] / theirs["peak_memory_gib"], 2)
            print(json.dumps({"ratio": "minidetr/hf", "setting": setting, **ratios}))
        sys.stdout.flush()


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        key, _, value = arg.removeprefix("--").partition("=")
        if key not in ("device", "batch_size", "height", "width", "backbone", "num_classes", "hidden_dim",
                       "num_encoder_layers", "num_decoder_layers", "dim_feedforward", "num_queries", "settings",
                       "channels_last", "warmup", "iters", "compare", "peak_tflops", "profile", "what"):
            sys.exit(f"error: unknown flag --{key}")
        default = globals()[key]
        globals()[key] = (value != "False") if isinstance(default, bool) else type(default)(value)
    main()
