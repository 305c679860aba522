"""
The data pipeline from a prepared dataset json (data/format.py) to padded batches, as train.py and
sample.py use it: images read as displayed, the paper's augmentation, a dataset of (image, target) pairs,
the padded batch and a training order that a resumed run can re-enter.

    from data.pipeline import DetectionDataset, collate, make_transforms
    train_set = DetectionDataset("data/shapes/train.json", make_transforms(True, [64], 96, [64], (48, 64), 64))
"""

import atexit
import math
import multiprocessing.util  # its exit handler is registered first, so end_data_workers (below) runs before it
import os
import signal
import sys
from functools import partial

import torch
import torchvision.transforms.v2 as v2
from PIL import Image, ImageOps
from torchvision import tv_tensors
from torchvision.ops import box_convert

from data.format import read_dataset_json


def dataset_dir(dataset):
    """A prepared dataset's folder: data/<dataset> (this file's folder), or the path itself if it is one."""
    return dataset if os.sep in dataset else os.path.join(os.path.dirname(os.path.abspath(__file__)), dataset)


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
NORMALIZE = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def read_image(image):
    """(3, H, W) uint8 pixels as displayed (a phone photo's EXIF orientation applied: data/format.py) of an
    image file or a PIL image, or None (with one logged line) for a file that cannot be decoded: a
    truncated or corrupt file, or a missing one."""
    if isinstance(image, Image.Image):  # turned in a copy: the caller's image is left as it is
        return v2.functional.pil_to_tensor(ImageOps.exif_transpose(image).convert("RGB"))
    try:
        with Image.open(image) as im:
            ImageOps.exif_transpose(im, in_place=True)  # a no-op without an orientation tag
            return v2.functional.pil_to_tensor(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as e:
        log_skip(f"skip: cannot decode {image} ({type(e).__name__})")
        return None


def log_skip(line):
    """A skip line on stderr, on a line of its own also while a progress bar is drawn there: on a terminal
    the bar's line is cleared first (the bar redraws below), in a file a newline ends it."""
    print(("\r\033[K" if sys.stderr.isatty() else "\n") + line, file=sys.stderr, flush=True)


class RandomSizeCrop(v2.Transform):
    """Crop a window whose height and width are drawn uniformly from [min_size, max_size], within
    the image (the official DETR crop; torchvision has no twin of it)."""

    def __init__(self, min_size, max_size):
        super().__init__()
        self.min_size, self.max_size = min_size, max_size

    def make_params(self, flat_inputs):
        H, W = v2.query_size(flat_inputs)
        h = int(torch.randint(min(self.min_size, H), min(H, self.max_size) + 1, ()))
        w = int(torch.randint(min(self.min_size, W), min(W, self.max_size) + 1, ()))
        top, left = int(torch.randint(0, H - h + 1, ())), int(torch.randint(0, W - w + 1, ()))
        return dict(top=top, left=left, height=h, width=w)

    def transform(self, inpt, params):
        return self._call_kernel(v2.functional.crop, inpt, **params)


def val_transform(val_scale, max_size):
    """Validation and inference: the shorter side resized to val_scale (the longer at most max_size)."""
    return v2.Compose([v2.Resize(val_scale, max_size=max_size), NORMALIZE])


def make_transforms(train, scales, max_size, crop_scales, crop_size, val_scale):
    """The paper's augmentation (§4, App. A.4): horizontal flip, then the shorter side resized to one
    of `scales` (longer side <= max_size), or with probability 0.5 first resized to one of
    `crop_scales` and cropped to a random window of crop_size[0]..crop_size[1] pixels (train=False:
    val_transform). Boxes follow the image through every step."""
    if not train:
        return val_transform(val_scale, max_size)
    resize = v2.RandomShortestSize(scales, max_size)
    crop_then_resize = v2.Compose([v2.RandomShortestSize(crop_scales), RandomSizeCrop(*crop_size), resize])
    return v2.Compose([
        v2.RandomHorizontalFlip(),
        v2.RandomChoice([resize, crop_then_resize]),
        v2.SanitizeBoundingBoxes(),  # drops boxes that the crop left with no area, and their labels
        NORMALIZE,
    ])


class DetectionDataset(torch.utils.data.Dataset):
    """Reads a prepared json. Returns (image (3, h, w) normalised float, target) with the target as
    the model and the loss take it: labels (N,) int64 class indices, boxes (N, 4) (cx, cy, w, h) in
    [0, 1] of the transformed image (N may be 0), plus image_id (the index in the json) and
    orig_size (H, W) for evaluation. Difficult objects are left out unless keep_difficult, crowds
    always. An image that cannot be decoded is skipped with one logged line and the next one is
    returned, so a batch keeps its size. mosaic_prob > 0 (training): a sample that the sampler allows
    it is a mosaic (below) with that probability, of at most max_objects objects, on tiles of mosaic_tile."""

    def __init__(self, json_path, transform, keep_difficult=False, mosaic_prob=0.0, mosaic_tile=0, max_objects=0):
        data = read_dataset_json(json_path)
        self.classes, self.records, self.category_ids = data["classes"], data["images"], data.get("category_ids")
        self.json_path = str(json_path)
        root = os.path.dirname(os.path.abspath(json_path))
        self.paths = [os.path.join(root, r["file"]) for r in self.records]  # join keeps absolute paths
        self.transform, self.keep_difficult = transform, keep_difficult
        self.mosaic_prob, self.mosaic_tile, self.max_objects = mosaic_prob, mosaic_tile, max_objects
        self.unreadable = set()

    def __len__(self):
        return len(self.records)

    def __getitem__(self, key):
        """key: an index, or (index, seed, mosaic allowed) to draw the augmentation from its own seed (so
        that a sample's augmentation does not depend on worker processes or on where a run resumed)."""
        index, aug_seed, mosaic = key if isinstance(key, tuple) else (key, None, False)
        with torch.random.fork_rng(devices=[], enabled=aug_seed is not None):
            if aug_seed is not None:
                torch.manual_seed(aug_seed)
            i, image = self.load(index)
            mosaic = mosaic and self.mosaic_prob > 0 and bool(torch.rand(()) < self.mosaic_prob)  # no draw when off
            return self.make_sample(i, image, mosaic)

    def load(self, index):
        """(i, (3, H, W) uint8) of the first image from index on that can be decoded."""
        for i in range(index, index + len(self)):
            i %= len(self)
            image = None if i in self.unreadable else read_image(self.paths[i])
            if image is not None:
                return i, image
            self.unreadable.add(i)  # logged once, then passed over
        raise RuntimeError(f"no image of {len(self)} could be decoded")

    def objects(self, i, image):
        """Image i's pixels and objects as tv_tensors: {"image", "boxes" (XYXY pixels), "labels"}."""
        record = self.records[i]
        boxes = torch.tensor(record["boxes"], dtype=torch.float32).reshape(-1, 4)  # xyxy pixels
        labels = torch.tensor(record["labels"], dtype=torch.int64)
        keep = ~torch.tensor(record.get("iscrowd", [0] * len(labels)), dtype=torch.bool)  # crowds never train
        if not self.keep_difficult:
            keep &= ~torch.tensor(record.get("difficult", [0] * len(labels)), dtype=torch.bool)
        return {"image": tv_tensors.Image(image), "labels": labels[keep],
                "boxes": tv_tensors.BoundingBoxes(boxes[keep], format="XYXY", canvas_size=tuple(image.shape[-2:]))}

    def make_sample(self, i, image, mosaic=False):
        sample = self.mosaic(self.objects(i, image)) if mosaic else self.objects(i, image)
        H, W = sample["boxes"].canvas_size
        sample = self.transform(sample)
        image = sample["image"].as_subclass(torch.Tensor)
        h, w = image.shape[-2:]
        boxes = box_convert(sample["boxes"].as_subclass(torch.Tensor), "xyxy", "cxcywh")
        boxes = boxes / torch.tensor([w, h, w, h], dtype=torch.float32)
        target = {"labels": sample["labels"], "boxes": boxes, "image_id": i, "orig_size": torch.tensor([H, W])}
        return image, target

    def mosaic(self, first):
        """Dense one-to-one (DEIM, Huang et al. CVPR 2025, §3.1): up to 4 training images on one 2x2 canvas,
        each resized (shorter side mosaic_tile) and randomly cropped to a mosaic_tile square tile, so that an
        image holds more, smaller objects and more queries are matched. The others are drawn at random, an
        image only while the objects stay within max_objects (a query matches one object: paper §3.1); a tile
        left over stays black. The canvas then takes the usual augmentation."""
        t = self.mosaic_tile
        tiles, count = [first], len(first["labels"])
        for j in torch.randint(len(self), (MOSAIC_DRAWS,)).tolist():  # drawn at once: the same draws however many fit
            if len(tiles) == 4:
                break
            tile = self.objects(*self.load(j))  # an image that cannot be decoded: the next one, as for any sample
            if count + len(tile["labels"]) <= self.max_objects:
                tiles.append(tile)
                count += len(tile["labels"])
        fit = v2.Compose([v2.Resize(t), v2.RandomCrop(t, pad_if_needed=True), v2.SanitizeBoundingBoxes()])
        images, boxes, labels = [], [], []
        for tile, place in zip(tiles, torch.randperm(4).tolist()):
            top, left = (place // 2) * t, (place % 2) * t
            tile = v2.Pad([left, top, t - left, t - top])(fit(tile))  # (3, 2t, 2t), zero off its quarter
            images.append(tile["image"])
            boxes.append(tile["boxes"])
            labels.append(tile["labels"])
        return {"image": tv_tensors.Image(torch.stack(images).sum(0, dtype=torch.uint8)), "labels": torch.cat(labels),
                "boxes": tv_tensors.BoundingBoxes(torch.cat(boxes), format="XYXY", canvas_size=(2 * t, 2 * t))}


MOSAIC_DRAWS = 6  # a mosaic draws this many other images for its 3 tiles, taking those whose objects fit


def worker_ignores_signals(worker_id):
    """A data worker leaves SIGTERM, SIGUSR1 and SIGINT to the main process: a scheduler may send them to
    every process of a job (scancel, a time limit, SLURM's --signal), and a terminal's Ctrl-C goes to its
    whole process group. The main process finishes its step, saves, then closes the workers through their
    queues (torch's shutdown); a worker whose main process is gone exits by itself within seconds (torch's
    watchdog). Without this a worker dies of the signal, and the main process stops with torch's
    "DataLoader worker ... is killed by signal" instead of saving."""
    for number in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(number, signal.SIG_IGN)


def kill_data_workers():
    """SIGKILL every data worker of this process (multiprocessing's daemon children)."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


@atexit.register
def end_data_workers():
    """At the exit of any script, a crash too: the data workers ignore SIGTERM (above), and an exception's
    traceback keeps their loader alive, so multiprocessing's own exit handler, which sends them SIGTERM and
    then joins them with no time limit, would wait forever. They hold nothing to save: they are killed."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report each killed worker as an error
    kill_data_workers()


def collate(batch, pad_to=1):
    """Pad images bottom/right to the batch's largest size, rounded up to a multiple of pad_to (fixed
    multiples let torch.compile reuse kernels). Returns images (B, 3, H, W), mask (B, H, W) True on
    padding, or None when nothing is padded, and the list of targets."""
    images, targets = zip(*batch)
    H = math.ceil(max(im.shape[1] for im in images) / pad_to) * pad_to
    W = math.ceil(max(im.shape[2] for im in images) / pad_to) * pad_to
    padded = images[0].new_zeros(len(images), 3, H, W)
    mask = torch.ones(len(images), H, W, dtype=torch.bool)
    for im, pad, m in zip(images, padded, mask):
        pad[:, : im.shape[1], : im.shape[2]].copy_(im)
        m[: im.shape[1], : im.shape[2]] = False
    return padded, (mask if mask.any() else None), list(targets)


class ResumableSampler(torch.utils.data.Sampler):
    """Endless training order that a resumed run can re-enter at any point: epoch e is a permutation
    drawn from seed + e, split across processes as DistributedSampler does (padded to a multiple of
    world_size, then every world_size-th index), and each index comes with its augmentation seed and
    whether it may be a mosaic (DetectionDataset.mosaic: among this process's first mosaic_until samples).
    start: how many samples this process has already consumed."""

    def __init__(self, num_samples, seed, start=0, rank=0, world_size=1, mosaic_until=0):
        self.num_samples, self.seed, self.start, self.rank, self.world_size = num_samples, seed, start, rank, world_size
        self.mosaic_until = mosaic_until

    def __iter__(self):
        per_rank = math.ceil(self.num_samples / self.world_size)
        epoch, offset = divmod(self.start, per_rank)
        position = self.start
        while True:
            order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + epoch))
            order = torch.cat([order, order[: per_rank * self.world_size - self.num_samples]])
            for i in order[self.rank :: self.world_size][offset:].tolist():
                yield i, (self.seed * 1_000_003 + epoch * self.num_samples + i) % 2**62, position < self.mosaic_until
                position += 1
            epoch, offset = epoch + 1, 0


def load_datasets(cfg):
    """train.py's datasets: (train_set, or None with eval_only, and val_set), from its config's dataset,
    splits and sizes; a missing split or other classes is one error line."""
    splits = [cfg.val_split] if cfg.eval_only else [cfg.train_split, cfg.val_split]
    json_paths = [os.path.join(dataset_dir(cfg.dataset), f"{split}.json") for split in splits]
    for path in json_paths:
        if not os.path.isfile(path):
            prepare = os.path.join(dataset_dir(cfg.dataset), "prepare.py")
            how = (f"python {os.path.relpath(prepare)}" if os.path.isfile(prepare)
                   else "see data/*/prepare.py and data/format.py")
            raise SystemExit(f"error: no {path}: prepare the dataset first ({how})")
    val_set = DetectionDataset(json_paths[-1], val_transform(cfg.val_scale, cfg.max_size))
    augment = make_transforms(True, cfg.train_scales, cfg.max_size, cfg.crop_scales, cfg.crop_size, cfg.val_scale)
    train_set = None if cfg.eval_only else DetectionDataset(
        json_paths[0], augment, cfg.keep_difficult, cfg.mosaic_prob, max(cfg.train_scales) // 2, cfg.num_queries)
    if train_set is not None and train_set.classes != val_set.classes:
        raise SystemExit(f"error: {json_paths[0]} and {json_paths[1]} have different classes")
    return train_set, val_set


def training_batches(train_set, cfg, start, rank=0, world_size=1, pin_memory=False):
    """Endless training batches from start (the samples this process consumed), in an order that is a
    pure function of (seed, samples consumed), so that a resumed run continues exactly; mosaics
    (mosaic_prob) only in the first mosaic_until of max_iters."""
    mosaic_until = int(cfg.mosaic_until * cfg.max_iters) * cfg.batch_size * cfg.gradient_accumulation_steps
    sampler = ResumableSampler(len(train_set), cfg.seed, start, rank, world_size, mosaic_until)
    return iter(torch.utils.data.DataLoader(
        train_set, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
        collate_fn=partial(collate, pad_to=cfg.pad_to), worker_init_fn=worker_ignores_signals, pin_memory=pin_memory,
        persistent_workers=cfg.num_workers > 0, generator=torch.Generator().manual_seed(cfg.seed)))


def to_device(images, mask, targets, device):
    """A batch on the device: NHWC images on a GPU (its convolutions run on tensor cores without layout
    transposes), and a mask even when nothing is padded (under compile, one graph rather than two)."""
    images = images.to(device, non_blocking=True)
    if "cuda" in device:
        images = images.contiguous(memory_format=torch.channels_last)
    mask = (mask.to(device, non_blocking=True) if mask is not None
            else images.new_zeros(images[:, 0].shape, dtype=torch.bool))
    return images, mask, [{k: t[k].to(device, non_blocking=True) for k in ("labels", "boxes")} for t in targets]


def too_many_objects(dataset, num_queries):
    """A warning line when images of a dataset hold more objects than num_queries (else None): a query is
    matched to one object at most (paper §3.1), so the rest are never learnt nor found."""
    counts = [len(r["labels"]) - sum(r.get("iscrowd", [])) for r in dataset.records]
    over = sum(n > num_queries for n in counts)
    if not over:
        return None
    return (f"warning: {over} of the {len(counts)} images of {dataset.json_path} hold more objects than num_queries="
            f"{num_queries} (up to {max(counts)}): a query finds one object at most, so raise num_queries")
