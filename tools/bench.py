"""
How fast is DETR here: training-step and inference images/s, peak GPU memory and model FLOPs
utilisation (MFU), on random input so that no data is needed. One JSON line per setting.

    python tools/bench.py                          # DETR-R50, 91 classes: GPU batch 8 at 800x1066, CPU 2 at 512x512
    python tools/bench.py --compare=hf             # the same for Hugging Face's DetrForObjectDetection, and the ratios
    python tools/bench.py --settings=bf16-compile --profile    # a Chrome trace of one training step, and its top ops
    python tools/bench.py --what=map               # compute_map on 5,000 images x 100 detections
    python tools/bench.py --what=memory --height=800 --width=1066 --num_classes=20   # EXPERIMENTS.md's memory table
    python tools/bench.py --what=gpu_check         # on a GPU: every GPU row of EXPERIMENTS.md, and gpu_check.json

A training step is forward + Hungarian matching + loss + backward + AdamW step; inference is
forward + postprocess. FLOPs are counted once per setting with torch.utils.flop_counter (attention
through SDPA's math path, so its matmuls are counted), and MFU divides them by the step time and
the device's peak dense bf16 TFLOPS (--peak_tflops; no default on CPU, so MFU is null there).
"""

import json
import statistics
import os
import sys
import time
import warnings
from contextlib import nullcontext
from functools import partial
from types import SimpleNamespace

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import train
from configurator import configure
from lib.metrics import compute_map
from additions.model import build_model, model_args
from detr import DETR
from lib.inference import compile_model

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
settings = "fp32-eager,fp32-compile,bf16-eager,bf16-compile" if on_gpu else "fp32-eager"  # <dtype>-<eager|compile>
channels_last = True  # the backbone's convolutions in NHWC, faster on tensor cores and in oneDNN
warmup = 5 if on_gpu else 2
iters = 20 if on_gpu else 5
repeats = 3  # timed turns per implementation, interleaved (A B A B ...): one pass of each is noise
additions = False  # config/voc.py's additions on (anchors, proposals, denoising, query groups, conditional attention)
compare = ""  # 'hf': also measure transformers' DetrForObjectDetection
peak_tflops = 0.0  # the device's dense bf16 peak; 0: looked up from the GPU's name
profile = False  # write trace.json for one training step of the first setting
what = "speed"  # 'speed'; 'memory' (peak memory at batch 1, 2, 4); 'gpu_check' (every GPU row); 'map'
duration = 180.0  # gpu_check: seconds of training config/voc.py's model with every addition
FLAGS = ("device", "batch_size", "height", "width", "backbone", "num_classes", "hidden_dim", "num_encoder_layers",
         "num_decoder_layers", "dim_feedforward", "num_queries", "settings", "channels_last", "warmup", "iters",
         "repeats", "additions", "compare", "peak_tflops", "profile", "what", "duration")
ADDITIONS = dict(anchor_queries=True, encoder_proposals=True, denoising_groups=3, query_groups=3,
                 conditional_cross_attn=True)

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


def random_batch(generator, size=None):
    """Images padded to one size (height x width unless given; the second is 3/4 as tall, so the mask
    matters) and 1-20 boxes each, on the device, the images channels-last if asked."""
    h, w = size or (height, width)
    images = torch.randn(batch_size, 3, h, w, generator=generator)
    mask = torch.zeros(batch_size, h, w, dtype=torch.bool)
    if batch_size > 1:
        mask[1, h * 3 // 4 :] = True
        images[1, :, h * 3 // 4 :] = 0
    targets = []
    for _ in range(batch_size):
        n = int(torch.randint(1, 21, (), generator=generator))
        centres, sizes = (torch.rand(n, 2, generator=generator) * 0.6 + 0.2,
                          torch.rand(n, 2, generator=generator) * 0.3 + 0.05)
        targets.append({"labels": torch.randint(0, num_classes, (n,), generator=generator).to(device),
                        "boxes": torch.cat([centres, sizes], 1).to(device)})
    images = images.to(device).contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return images, mask.to(device), targets


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

    def __init__(self, with_additions=False):
        additions = ADDITIONS if with_additions else {}
        self.model = build_model(num_classes=num_classes, backbone=backbone, hidden_dim=hidden_dim,
                                 num_encoder_layers=num_encoder_layers, num_decoder_layers=num_decoder_layers,
                                 dim_feedforward=dim_feedforward, num_queries=num_queries, **additions).to(device)
        self.denoising = additions.get("denoising_groups", 0) > 0  # its queries copy the targets
        if channels_last:
            self.model.backbone.to(memory_format=torch.channels_last)
        defaults = {k: getattr(train, k) for k in train.CONFIG_KEYS}  # train.py's costs and weights
        self.criterion = train.new_criterion(SimpleNamespace(**defaults), model_args(self.model)).to(device)
        self.optimizer = make_optimizer(self.model)

    def compile(self):
        compile_model(self.model)  # as train.py does: the backbone and each layer, dynamic sizes

    def train_step(self, images, mask, targets, autocast):
        with autocast:
            outputs = self.model(images, mask, targets) if self.denoising else self.model(images, mask)
        backward_and_step(self.criterion(outputs, targets)["loss"], self.model, self.optimizer)

    def infer(self, images, mask, autocast):
        with torch.no_grad(), autocast:
            return self.model.postprocess(self.model(images, mask), [(height, width)] * len(images))


class HFDETR:
    """transformers' DetrForObjectDetection with the same sizes, random weights, its own loss."""

    name = "hf"

    def __init__(self):
        try:
            from transformers import DetrConfig, DetrForObjectDetection
        except ImportError:
            raise SystemExit("error: --compare=hf needs transformers and timm: pip install transformers timm") from None
        config = DetrConfig(num_labels=num_classes, num_queries=num_queries, d_model=hidden_dim,
                            encoder_layers=num_encoder_layers, decoder_layers=num_decoder_layers,
                            encoder_ffn_dim=dim_feedforward, decoder_ffn_dim=dim_feedforward, auxiliary_loss=True,
                            attention_dropout=0.1, activation_dropout=0.1, backbone=backbone,
                            use_pretrained_backbone=False)
        self.model = DetrForObjectDetection(config).to(device).train()
        for name, p in self.model.named_parameters():  # the same frozen stem and layer1 as the paper (and minidetr)
            if "backbone" in name and not any(f"layer{i}." in name for i in (2, 3, 4)):
                p.requires_grad_(False)
        self.optimizer = make_optimizer(self.model)
        self.forward = self.model

    def compile(self):
        self.forward = torch.compile(self.model)

    def train_step(self, images, mask, targets, autocast):
        labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
        with autocast:
            loss = self.forward(pixel_values=images, pixel_mask=(~mask).long(), labels=labels).loss
        backward_and_step(loss, self.model, self.optimizer)

    def infer(self, images, mask, autocast):
        with torch.no_grad(), autocast:
            out = self.forward(pixel_values=images, pixel_mask=(~mask).long())
            # the paper's postprocess, as minidetr's (it reads no weights: the class stands for a model)
            return DETR.postprocess(DETR, {"pred_logits": out.logits, "pred_boxes": out.pred_boxes},
                                    [(height, width)] * len(images))


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


def measure(impl_classes, setting):
    """Train and inference images/s of each implementation at one setting, timed in turns (A B A B
    ..., `repeats` times), so that a slow spell of the machine falls on both. Returns one record per
    implementation: the median of its turns, their range, its peak memory and MFU."""
    dtype, mode = setting.split("-")
    images, mask, targets = random_batch(torch.Generator().manual_seed(0))
    autocast = nullcontext() if dtype == "fp32" else torch.autocast(device, dtype=torch.bfloat16)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    impls, records = [], []
    for impl_class in impl_classes:
        torch.manual_seed(0)
        before = torch.cuda.memory_allocated() if device == "cuda" else 0
        impl = impl_class()
        # FLOPs of one training step, counted once, eager (SDPA's math path, which the counter sees through)
        with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
            impl.train_step(images, mask, targets, autocast)
        if mode == "compile":
            impl.compile()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        timed(lambda: impl.train_step(images, mask, targets, autocast), warmup)  # compiles, if it does
        peak_memory = (torch.cuda.max_memory_allocated() - before) / 2**30 if device == "cuda" else None
        impls.append(impl)
        records.append({
            "impl": impl.name, "setting": setting, "device": device_name(),
            "torch": torch.__version__, "batch_size": batch_size, "image_size": [height, width],
            "peak_memory_gib": None if peak_memory is None else round(peak_memory, 2),
            "train_gflops_per_img": round(counter.get_total_flops() / batch_size / 1e9, 1),
        })
    train_times, infer_times = [[] for _ in impls], [[] for _ in impls]
    for _ in range(repeats):
        for impl, times in zip(impls, train_times):
            times.append(timed(lambda: impl.train_step(images, mask, targets, autocast), iters))
    if profile and impls[0].name == "minidetr":
        write_profile(lambda: impls[0].train_step(images, mask, targets, autocast))
    for impl in impls:
        impl.model.eval()
        timed(lambda: impl.infer(images, mask, autocast), warmup)
    for _ in range(repeats):
        for impl, times in zip(impls, infer_times):
            times.append(timed(lambda: impl.infer(images, mask, autocast), iters))
    peak = device_peak()
    for record, train_s, infer_s in zip(records, train_times, infer_times):
        flops = record["train_gflops_per_img"] * 1e9 * batch_size
        record.update({
            "train_img_per_s": round(batch_size / statistics.median(train_s), 3),
            "train_img_per_s_range": [round(batch_size / max(train_s), 3), round(batch_size / min(train_s), 3)],
            "infer_img_per_s": round(batch_size / statistics.median(infer_s), 3),
            "infer_img_per_s_range": [round(batch_size / max(infer_s), 3), round(batch_size / min(infer_s), 3)],
            "mfu": None if peak is None else round(flops / statistics.median(train_s) / peak, 4),
            "train_times": train_s, "infer_times": infer_s,
        })
    return records


def ratio(ours, theirs):
    """minidetr / HF per turn (each turn timed back to back): the median and the range."""
    record = {"ratio": "minidetr/hf", "setting": ours["setting"]}
    for what in ("train", "infer"):
        per_turn = sorted(b / a for a, b in zip(ours.pop(f"{what}_times"), theirs.pop(f"{what}_times")))
        record[f"{what}_img_per_s"] = round(statistics.median(per_turn), 2)
        record[f"{what}_range"] = [round(per_turn[0], 2), round(per_turn[-1], 2)]
    if ours["peak_memory_gib"]:
        record["peak_memory"] = round(ours["peak_memory_gib"] / theirs["peak_memory_gib"], 2)
    return record


def additions_run():
    """config/voc.py's model with every addition, bf16 and compiled as train.py compiles it, trained for
    `duration` seconds on batches of varying size (shorter side 480-800) and object count: images/s,
    the graphs compiled after its first 5 steps (0 is the goal) and the host syncs of a step."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # the graphs counted are this run's own
    counters.clear()
    torch._dynamo.config.fail_on_recompile_limit_hit = True  # never a silent fall back to eager
    torch.manual_seed(0)
    impl = MiniDETR(with_additions=True)
    impl.compile()
    autocast = torch.autocast(device, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    step, images_done, syncs, t_start = 0, 0, [], None
    while t_start is None or time.perf_counter() - t_start < duration:
        size = (32 * int(torch.randint(15, 26, (), generator=g)), 32 * int(torch.randint(20, 34, (), generator=g)))
        images, mask, targets = random_batch(g, size)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if device == "cuda":
                torch.cuda.set_sync_debug_mode("warn")  # every host sync becomes a warning
            impl.train_step(images, mask, targets, autocast)
            if device == "cuda":
                torch.cuda.set_sync_debug_mode("default")
        syncs.append(sum("synchroniz" in str(w.message) for w in caught))
        step += 1
        if step == 5:  # warmed up: the graphs compiled so far, and the clock starts
            synchronize()
            graphs_warm, t_start = counters["stats"]["unique_graphs"], time.perf_counter()
        elif step > 5:
            images_done += batch_size
    synchronize()
    return {"what": "voc.py model, all additions, bf16, compiled", "device": device_name(), "batch_size": batch_size,
            "steps": step - 5, "train_img_per_s": round(images_done / (time.perf_counter() - t_start), 3),
            "graphs_first_5_steps": graphs_warm, "graphs_after": counters["stats"]["unique_graphs"] - graphs_warm,
            "host_syncs_per_step": statistics.median(syncs[5:]) if device == "cuda" else None}


def device_name():
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def gpu_check(path="gpu_check.json"):
    """Everything EXPERIMENTS.md's GPU rows need, in one command: each setting's speed, memory and MFU for
    minidetr and Hugging Face's DETR (timed in turns), then additions_run. Writes path, prints rows."""
    from importlib.util import find_spec

    impls = [partial(MiniDETR, additions)]
    if find_spec("transformers") and find_spec("timm"):
        impls.append(HFDETR)
    else:
        print("skip Hugging Face's DETR: pip install transformers timm to compare", file=sys.stderr)
    lines = []
    for setting in settings.split(",") + ["additions"]:
        lines += [additions_run()] if setting == "additions" else speed_lines(impls, setting)
        with open(path, "w") as f:  # after each part: what was measured survives a later failure
            json.dump(lines, f, indent=1)
    date = time.strftime("%Y-%m-%d")
    for r in lines:
        if r.get("impl") == "minidetr":
            theirs = next((o for o in lines if o.get("ratio") and o["setting"] == r["setting"]), None)
            print(f"| {r['device']} | {r['torch']} | {date} | {r['setting']}, batch {r['batch_size']}, "
                  f"{r['image_size'][0]}x{r['image_size'][1]} | {r['train_img_per_s']} / {r['infer_img_per_s']} | "
                  f"{r['peak_memory_gib']} GiB, MFU {r['mfu']} | "
                  + (f"{theirs['train_img_per_s']} / {theirs['infer_img_per_s']} (ranges {theirs['train_range']}, "
                     f"{theirs['infer_range']})" if theirs else "-") + " |")
    run = lines[-1]
    print(f"| {run['device']} | {torch.__version__} | {date} | {run['what']}, batch {run['batch_size']}, 480-800 px | "
          f"{run['train_img_per_s']} img/s | graphs: {run['graphs_first_5_steps']} in 5 steps, {run['graphs_after']} "
          f"after; host syncs a step: {run['host_syncs_per_step']} | |")
    print(f"wrote {path}", file=sys.stderr)


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


def resident_gib(field):
    """This process's resident memory (VmRSS) or its peak so far (VmHWM), from /proc (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 2**20


def step_memory(overrides, dtype):
    """Run in a fresh process, as the peak cannot be reset: two training steps with these globals
    (the second has AdamW's state too), and the peak resident memory above what the process held
    before the model was built (GiB): weights, gradients, optimizer state and activations."""
    globals().update(overrides)
    before = resident_gib("VmRSS")
    impl = MiniDETR(additions)
    images, mask, targets = random_batch(torch.Generator().manual_seed(0))
    autocast = nullcontext() if dtype == "fp32" else torch.autocast(device, dtype=torch.bfloat16)
    for _ in range(2):
        impl.train_step(images, mask, targets, autocast)
    return resident_gib("VmHWM") - before


def bench_memory():
    """The peak memory of a training step at batch 1, 2 and 4, with and without the additions, in
    fp32 and bf16 (CPU autocast), and from its slope per image the batch that fits a GPU. Estimated
    from CPU: a GPU adds its context (~1 GiB here) and allocator slack (10% here)."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    sizes = {}
    for dtype in ("fp32", "bf16"):
        for with_additions in (False, True):
            for batch in (1, 2, 4):
                settings = {**{k: globals()[k] for k in FLAGS}, "device": "cpu", "additions": with_additions,
                            "batch_size": batch}
                with context.Pool(1) as pool:
                    gib = pool.apply(step_memory, (settings, dtype))
                sizes.setdefault((dtype, with_additions), []).append((batch, gib))
                print(json.dumps({"what": "memory", "dtype": dtype, **settings, "peak_gib": round(gib, 2)}),
                      flush=True)
    for (dtype, with_additions), points in sizes.items():
        per_image = (points[-1][1] - points[0][1]) / (points[-1][0] - points[0][0])
        fixed = points[0][1] - per_image
        fits = [max(0, int((0.9 * gpu - 1 - fixed) // per_image)) for gpu in (24, 40, 80)]
        print(f"| {dtype} | {'all' if with_additions else 'none'} | {fixed:.1f} | {per_image:.2f} | "
              + " | ".join(str(f) for f in fits) + " |")


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
    result = compute_map(detections, ground_truths, 20)
    seconds = time.perf_counter() - t
    print(json.dumps({"what": "compute_map", "images": 5000, "detections_per_image": 100, "seconds": round(seconds, 2),
                      **{k: round(v, 4) for k, v in result.items() if not k.endswith("_per_class")}}))


def main():
    if what == "map":
        return bench_map()
    if what == "memory":
        return bench_memory()
    if what == "gpu_check":
        return gpu_check()
    impls = [partial(MiniDETR, additions)] + ([HFDETR] if compare == "hf" else [])
    for setting in settings.split(","):
        for line in speed_lines(impls, setting):
            print(json.dumps(line), flush=True)


def speed_lines(impls, setting):
    """measure's records, and with two implementations their ratio, without the per-turn times."""
    records = measure(impls, setting)
    lines = records + ([ratio(*records)] if len(records) == 2 else [])
    for record in records:
        record.pop("train_times", None), record.pop("infer_times", None)
    return lines


if __name__ == "__main__":
    globals().update(configure({k: globals()[k] for k in FLAGS}, sys.argv[1:]))
    if what not in ("speed", "memory", "gpu_check", "map") or compare not in ("", "hf"):
        sys.exit(f"error: --what must be speed, memory, gpu_check or map, and --compare '' or hf "
                 f"(not {what!r}, {compare!r})")
    main()
