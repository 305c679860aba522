"""
Run a model over images as its training run evaluated them: resized to its val_scale, normalised,
batched and padded as its run batched them, under its autocast. The one path of every evaluation and
detection: train.py's evaluation, tools/eval.py's report, sample.py's pictures and --json, and the Python
API (sample.detect):

    from lib.inference import ImageFiles, predict
    predictions = predict(model, ImageFiles(["photo.jpg"], model), "cpu")   # {0: {"scores", "labels", "boxes"}}

Batching matters: DETR's outputs move with the padding of the batch an image is in (its keys and the
positions see the padded frame), so a model is best run at its own run's batch size and padding.
"""

import math
from contextlib import nullcontext
from functools import partial

import torch

from data.format import class_key
from data.pipeline import collate, read_image, val_transform, worker_ignores_signals
from lib.metrics import compute_map, ground_truth
from lib.processes import gather


def autocast(device, dtype):
    """The forward pass in dtype (float32: as it is), as train.py's loop and every evaluation run it."""
    device_type = "cuda" if "cuda" in str(device) else "cpu"
    return nullcontext() if dtype == "float32" else torch.autocast(device_type, dtype=getattr(torch, dtype))


def is_out_of_memory(error):
    """Whether a RuntimeError is an out-of-memory error: torch's, or the CPU allocator's."""
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)


class ImageFiles(torch.utils.data.Dataset):
    """Images (file paths or PIL images, as displayed: EXIF orientation applied) -> (image (3, h, w) at the
    model's val_scale, normalised, {"image_id": its index, "orig_size": (H, W)}), or None for a file that
    cannot be decoded (logged; predict leaves it out)."""

    def __init__(self, images, model):
        self.images = list(images)
        self.transform = val_transform(model.eval_config["val_scale"], model.eval_config["max_size"])

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        pixels = read_image(self.images[i])
        if pixels is None:
            return None
        return self.transform(pixels).float(), {"image_id": i, "orig_size": torch.tensor(pixels.shape[-2:])}


def collate_readable(batch, pad_to=1):
    """collate over the images that could be read; None when none could."""
    batch = [b for b in batch if b is not None]
    return collate(batch, pad_to) if batch else None


@torch.no_grad()
def predict(model, dataset, device, batch_size=None, pad_to=None, dtype="float32", num_workers=0, indices=None,
            stop=None, layers=False):
    """{image id: its postprocessed detections (every query's; float32, on the CPU)} of the dataset's images
    (those of indices, else all), batch_size at a time, padded to a multiple of pad_to (both default to the
    model's run's: model.eval_config). dataset: an ImageFiles, or a DetectionDataset (its val transform).
    An image that cannot be decoded is left out. None when stop() turns true before a batch (a signal);
    out of memory is one error line naming the batch. layers: each image's dict also holds "layers", the
    detections after every decoder layer (the auxiliary heads'; the last is the dict itself)."""
    batch_size, pad_to = batch_size or model.eval_config["batch_size"], pad_to or model.eval_config["pad_to"]
    was_training = model.training
    model.eval()
    subset = torch.utils.data.Subset(dataset, range(len(dataset)) if indices is None else indices)
    loader = torch.utils.data.DataLoader(
        subset, batch_size=batch_size, num_workers=num_workers, collate_fn=partial(collate_readable, pad_to=pad_to),
        worker_init_fn=worker_ignores_signals, generator=torch.Generator())  # leaves the global RNG (dropout) alone
    predictions = {}
    for batch in loader:
        if stop is not None and stop():
            predictions = None
            break
        if batch is None:
            continue
        images, mask, targets = batch
        try:
            with autocast(device, dtype):
                outputs = model(images.to(device), None if mask is None else mask.to(device))
        except RuntimeError as e:
            if not is_out_of_memory(e):
                raise
            raise SystemExit(f"error: out of memory evaluating a batch of {len(images)} images padded to "
                             f"{images.shape[2]}x{images.shape[3]} on {device}; lower the evaluation's "
                             f"batch_size={batch_size} or its image size (val_scale)") from None
        sizes = torch.stack([t["orig_size"] for t in targets])
        results = model.postprocess(outputs, sizes)
        earlier = [()] * len(results)  # per image: its detections after each earlier decoder layer
        if layers and outputs["aux_outputs"]:
            earlier = list(zip(*[model.postprocess(aux, sizes) for aux in outputs["aux_outputs"]]))
        for target, r, before in zip(targets, results, earlier):
            last = on_cpu(r)
            predictions[target["image_id"]] = {**last, "layers": [*map(on_cpu, before), last]} if layers else last
    model.train(was_training)
    return predictions


def class_map(model, classes):
    """For each of the model's outputs, the dataset's class of the same name (data/format.class_key), -1 for
    none (its detections are left out); one note line for classes on one side only, one error line when
    none is shared."""
    if model.classes is None:  # an official-format file fine-tuned elsewhere: its outputs by number
        if model.num_classes != len(classes):
            raise SystemExit(f"error: the model names no classes and has {model.num_classes} of them, "
                             f"the dataset {len(classes)}")
        print(f"note: the model names no classes: its {model.num_classes} outputs are taken as the dataset's, in order")
        return torch.arange(len(classes))
    names = [class_key(c) for c in classes]
    mapping = torch.tensor([names.index(class_key(c)) if class_key(c) in names else -1 for c in model.classes])
    shared = set(mapping.tolist()) - {-1}
    if not shared:
        raise SystemExit(f"error: the model's classes {model.classes[:5]}... and the dataset's {classes[:5]}... "
                         "share no name")
    if len(shared) < len(classes):
        missing = [c for i, c in enumerate(classes) if i not in shared]
        print(f"note: {len(missing)} of the dataset's classes are not among the model's ({', '.join(missing[:10])}): "
              "their AP is 0")
    if (mapping < 0).any():
        dropped = [c for c, m in zip(model.classes, mapping.tolist()) if m < 0]
        print(f"note: the detections of the model's {len(dropped)} classes that the dataset lacks "
              f"({', '.join(dropped[:10])}) are left out")
    return mapping


def on_cpu(result):
    """A postprocessed result on the CPU, its scores and boxes in float32."""
    return {k: v.cpu() if k == "labels" else v.float().cpu() for k, v in result.items()}


def run_dtype(model, device):
    """The autocast a model runs under on device: its run's on a GPU, float32 on a CPU."""
    return model.eval_config["dtype"] if "cuda" in str(device) else "float32"


def evaluate(model, dataset, cfg, device, rank=0, world_size=1, stop=None):
    """mAP of the model on a dataset (compute_map), each process taking every world_size-th batch. None
    when stop() turned true on any process (a signal: the evaluation is left for the resume)."""
    batches = range(rank, math.ceil(len(dataset) / cfg.batch_size), world_size)  # whole batches: one process's padding
    shard = [i for b in batches for i in range(b * cfg.batch_size, min((b + 1) * cfg.batch_size, len(dataset)))]
    parts = gather(predict(model, dataset, device, cfg.batch_size, cfg.pad_to, cfg.dtype, cfg.num_workers, shard, stop),
                   world_size)
    if any(part is None for part in parts):
        return None
    predictions = {i: p for part in parts for i, p in part.items()}  # every process's shard
    image_ids = sorted(predictions)
    detections = [predictions[i] for i in image_ids]
    ground_truths = [ground_truth(dataset.records[i]) for i in image_ids]
    return compute_map(detections, ground_truths, len(dataset.classes), cfg.max_dets)


def compile_model(model, backend="inductor"):
    """torch.compile the backbone and each encoder and decoder layer, in place (the checkpoint's keys
    stay as they are). What runs between them (encoder proposals, the denoising queries made from each
    image's targets) stays eager, so that no object count reaches a graph, and image sizes are dynamic:
    a run compiles a few graphs in its first steps (again at the first non-square batch) and at its
    first evaluation, and none after."""
    for part in [model.backbone, *model.encoder, *model.decoder]:
        part.compile(dynamic=True, backend=backend)
    if hasattr(model, "decoder_layer"):  # the additions' decoder runs its layers through this function instead
        model.decoder_layer = torch.compile(model.decoder_layer, dynamic=True, backend=backend)
