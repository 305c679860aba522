"""
Export a trained minidetr model, or an official DETR, to ONNX, and check the file with onnxruntime;
or write it as a Hugging Face transformers folder.

    python tools/export.py --ckpt=out-shapes/ckpt.pt --out=shapes.onnx
    python tools/export.py --ckpt=detr-r50 --out=detr-r50.onnx
    python tools/export.py --ckpt=out-custom/best.pt --hf=detr-mine  # for DetrForObjectDetection.from_pretrained

The graph takes `images` (B, 3, H, W) float32, ImageNet-normalised and padded bottom/right, and
`mask` (B, H, W) bool, True on padding (all False when nothing is padded), with B, H and W dynamic;
it returns `pred_logits` (B, Q, K+1) and `pred_boxes` (B, Q, 4) exactly as detr.py's forward does
(DETR.postprocess turns them into scored boxes in pixels). A model trained with a sigmoid class loss
(cls_loss 'focal' or 'iou_aware') gives K logits, each class's own sigmoid score, no "no object": the
export prints which it is. Each side must be at least the backbone's stride (32, or the model's feature_stride).

After exporting, the file is run with onnxruntime on two batches of different sizes, each with a
second, padded image, and the largest differences from PyTorch are printed (the aim: <= 1e-4).
The exporter is torch.onnx's dynamo exporter (torch.export), the one PyTorch develops; the older
TorchScript exporter is not used. Needs the optional export packages:
    pip install -r requirements-export.txt

--hf=DIR writes config.json (the classes as id2label, a dataset's own ids as category_ids),
model.safetensors and preprocessor_config.json, for a model with no addition switched on (the
paper's DETR, which transformers has). With transformers and timm installed, the folder is loaded
back with DetrForObjectDetection and its outputs compared with minidetr's on the same batches.
"""

import logging
import os
import sys
import time
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from additions.model import model_args
from configurator import configure
from lib.weights import LoadError, load_model, write_transformers_folder

# defaults, each overridable as --key=value
ckpt = ""  # a minidetr checkpoint (out_dir/ckpt.pt or best.pt), an official file / name, a transformers folder / hub id
out = "model.onnx"  # the ONNX file written
sizes = "480x640,400x320"  # HxW of the two check batches (each gets a second, padded image)
opset = 18  # the ONNX opset
hf = ""  # a folder: write a transformers DetrForObjectDetection there instead of an ONNX file


class Exported(nn.Module):
    """The part of DETR that the graph holds: images and mask in, last layer's logits and boxes out."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images, mask):
        outputs = self.model(images, mask)
        return outputs["pred_logits"], outputs["pred_boxes"]


def export(model, path, example_size=(320, 480)):
    """Write the ONNX file with dynamic batch, height and width; returns the path."""
    model = Exported(model.eval())
    images = torch.randn(2, 3, *example_size)
    mask = torch.zeros(2, *example_size, dtype=torch.bool)
    mask[1, :, example_size[1] // 2:] = True  # a padded image, so the graph is traced with a real mask
    batch, height, width = torch.export.Dim("batch", min=1), torch.export.Dim.DYNAMIC, torch.export.Dim.DYNAMIC
    logging.getLogger("onnxscript").setLevel(logging.ERROR)  # its optimizer logs every op it leaves alone
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (images, mask), path, dynamo=True, opset_version=opset, external_data=False,
                          input_names=["images", "mask"], output_names=["pred_logits", "pred_boxes"], verbose=False,
                          dynamic_shapes={"images": {0: batch, 2: height, 3: width},
                                          "mask": {0: batch, 1: height, 2: width}})
    return path


def check_inputs(check_sizes, min_side, seed=0):
    """Batches for the check: per size (H, W), one image of that size and one padded smaller one."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for H, W in check_sizes:
        images = torch.randn(2, 3, H, W, generator=generator)
        mask = torch.zeros(2, H, W, dtype=torch.bool)
        h, w = max(min_side, H * 3 // 4), max(min_side, W // 2)
        images[1, :, h:], images[1, :, :, w:] = 0, 0
        mask[1, h:], mask[1, :, w:] = True, True
        batches.append((images, mask))
    return batches


def compare(model, path, batches):
    """Largest |onnxruntime - PyTorch| over the batches, for logits and for boxes."""
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    worst = [0.0, 0.0]
    for images, mask in batches:
        with torch.no_grad():
            expected = Exported(model.eval())(images, mask)
        got = session.run(None, {"images": images.numpy(), "mask": mask.numpy()})
        for i in range(2):
            worst[i] = max(worst[i], (torch.from_numpy(got[i]) - expected[i]).abs().max().item())
    return worst


def compare_transformers(model, folder, batches):
    """Largest |transformers - minidetr| over the batches, for logits and for boxes."""
    import transformers

    reference = transformers.DetrForObjectDetection.from_pretrained(folder).eval()
    worst = [0.0, 0.0]
    for images, mask in batches:
        with torch.no_grad():
            expected = Exported(model.eval())(images, mask)
            got = reference(pixel_values=images, pixel_mask=(~mask).long())
        for i, theirs in enumerate((got.logits, got.pred_boxes)):
            worst[i] = max(worst[i], (theirs - expected[i]).abs().max().item())
    return worst


def latency(model, path, size, runs=5):
    """Median seconds of one forward pass of a (1, 3, H, W) image: PyTorch eager, then onnxruntime."""
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    images, mask = torch.randn(1, 3, *size), torch.zeros(1, *size, dtype=torch.bool)
    timings = []
    for run in (lambda: model(images, mask),
                lambda: session.run(None, {"images": images.numpy(), "mask": mask.numpy()})):
        seconds = []
        for _ in range(runs + 1):  # the first is a warm-up
            start = time.perf_counter()
            with torch.no_grad():
                run()
            seconds.append(time.perf_counter() - start)
        timings.append(sorted(seconds[1:])[runs // 2])
    return timings


def main():
    if hf:
        return main_transformers()
    try:
        import onnx  # noqa: F401  (the exporter needs it)
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"error: export needs onnx, onnxscript and onnxruntime ({e.name} is missing): "
                         "pip install -r requirements-export.txt")
    if not ckpt:
        raise SystemExit("error: give --ckpt=PATH (a minidetr, official or transformers checkpoint) or --ckpt=detr-r50")
    try:
        check_sizes = [tuple(int(v) for v in s.split("x")) for s in sizes.split(",")]
        assert all(len(s) == 2 for s in check_sizes)
    except (ValueError, AssertionError):
        raise SystemExit(f"error: --sizes={sizes} should be HxW pairs, such as 480x640,400x320") from None
    try:
        model = load_model(ckpt)[0]
    except LoadError as e:
        raise SystemExit(f"error: {e}")
    stride = model.config.get("feature_stride", 32)
    if min(min(s) for s in check_sizes) < stride:
        raise SystemExit(f"error: --sizes={sizes}: every side must be at least the backbone's stride, {stride} pixels")
    if os.path.dirname(os.path.abspath(out)) and not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        raise SystemExit(f"error: no folder for --out={out}")
    export(model, out)
    logits, boxes = compare(model, out, check_inputs(check_sizes, stride))
    print(f"wrote {out} ({os.path.getsize(out) / 1e6:.1f} MB); onnxruntime vs PyTorch on {sizes} "
          f"(one image padded): max |diff| logits {logits:.2e}, boxes {boxes:.2e}")
    cls_loss = model_args(model)["cls_loss"]
    print(f"pred_logits: {model.num_classes} sigmoid scores, one per class (cls_loss={cls_loss!r})" if cls_loss != "ce"
          else f"pred_logits: {model.num_classes} classes then \"no object\", read with a softmax")
    eager, ort = latency(model.eval(), out, check_sizes[0])
    print(f"latency of one {check_sizes[0][0]}x{check_sizes[0][1]} image on {torch.get_num_threads()} threads: "
          f"PyTorch eager {eager * 1000:.0f} ms, onnxruntime {ort * 1000:.0f} ms")


def main_transformers():
    if not ckpt:
        raise SystemExit("error: give --ckpt=PATH (a minidetr, official or transformers checkpoint) with --hf=DIR")
    try:
        model, config = load_model(ckpt)
        write_transformers_folder(model, hf, config["val_scale"], config["max_size"])
    except (LoadError, OSError) as e:
        raise SystemExit(f"error: {e}")
    print(f"wrote {hf}/ (config.json with {model.num_classes} classes, model.safetensors, preprocessor_config.json)")
    try:
        import timm  # noqa: F401  (transformers builds DETR's ResNet with it)
        import transformers  # noqa: F401
    except ImportError:
        print("pip install transformers timm to check it against transformers' DetrForObjectDetection")
        return
    logits, boxes = compare_transformers(model, hf, check_inputs([(480, 640), (400, 320)], 32))
    print(f"transformers' DetrForObjectDetection vs minidetr (one image padded): max |diff| logits {logits:.2e}, "
          f"boxes {boxes:.2e}")


if __name__ == "__main__":
    globals().update(configure({k: globals()[k] for k in ("ckpt", "out", "sizes", "opset", "hf")}, sys.argv[1:]))
    main()
