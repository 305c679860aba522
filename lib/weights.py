"""
Every weight format minidetr reads and writes, in one file (detr.py holds the model alone):

    - the official facebookresearch/detr checkpoints: a known name ('detr-r50', ...) or a .pth file;
    - minidetr's own checkpoints (train.py's out_dir/ckpt.pt and best.pt): atomic save, load, resume;
    - Hugging Face transformers DETRs: a folder (config.json and model.safetensors) or a hub id, in and out;
    - torchvision's ImageNet weights for the backbone (the paper starts from them).

One function loads any of them: `model, config = load_model(path)` (`DETR.from_pretrained(path)`
calls it). Every file is read with weights_only=True: a checkpoint runs no code.

    from lib.weights import load_model
    model, config = load_model("detr-r50")        # the official COCO model, with model.classes
"""

import importlib.util
import inspect
import json
import math
import os
import re
import shutil

import torch
import torchvision

from data.format import class_key
from additions.model import ADDITIONS_OFF, AdditionsDETR, build_model, model_args
from detr import BACKBONES, DETR

class LoadError(RuntimeError):
    """A checkpoint or weights file could not be loaded; the message is one line meant for the user."""


def load_model(path, **overrides):
    """Any model minidetr reads, with its classes (model.classes, None where the file names none) and
    dataset ids (model.category_ids): a minidetr checkpoint (train.py's ckpt.pt / best.pt), an official
    one (a name or a .pth file) or a transformers DETR (a folder or a hub id), with how its run evaluated
(model.eval_config: the checkpoint's sizes, batch and autocast; else the paper's). Returns (model, config):
    a minidetr checkpoint's training config (its dataset, val_scale, max_size), else {"val_scale",
    "max_size"}: the sizes in a transformers folder's preprocessor_config.json, or DETR's own 800 and
    1333. overrides: DETR arguments the weights leave open (dropout, trainable_layers; num_heads and
    dilation for an official .pth, which does not say them). An official model's `assumed` names the
    settings its file does not say (num_heads; dilation too for a .pth), taken from the defaults or overrides."""
    paper_sizes = {"val_scale": 800, "max_size": 1333}
    if path in OFFICIAL_CHECKPOINTS:
        checkpoint = download_official_checkpoint(path)
        model = model_from_official_checkpoint(checkpoint, path, **{"dilation": "-dc5" in path, **overrides})
        model.assumed = ("num_heads",)
        return model, paper_sizes
    folder = fetch_transformers_folder(path)
    if folder is not None:
        val_scale, max_size = transformers_image_size(folder)
        model = model_from_transformers_folder(folder, path, **overrides)
        model.eval_config.update(val_scale=val_scale, max_size=max_size)
        return model, {"val_scale": val_scale, "max_size": max_size}
    checkpoint = load_checkpoint_file(path)
    if "model_args" not in checkpoint:  # an official-format file, read once
        model = model_from_official_checkpoint(checkpoint, path, **overrides)
        model.assumed = ("num_heads", "dilation")
        return model, paper_sizes
    missing = [k for k in ("classes", "config") if k not in checkpoint]  # model_from_checkpoint checks the rest
    if missing:
        raise LoadError(f"{path}: not a minidetr checkpoint (no '{missing[0]}')")
    if checkpoint["model_args"].get("num_classes") != len(checkpoint["classes"]):
        raise LoadError(f"{path}: the model has {checkpoint['model_args'].get('num_classes')} classes but the "
                        f"checkpoint names {len(checkpoint['classes'])}")
    model = model_from_checkpoint(checkpoint, path, **overrides)
    model.eval_config.update({k: checkpoint["config"][k] for k in model.eval_config if k in checkpoint["config"]})
    return model, checkpoint["config"]


def load_named_state_dict(model, named, source, kind, their_key):
    """Load {our key: (the file's key, tensor)} into model after checking every key and shape, so that a
    wrong file fails with one line naming the first bad key as the file names it (their_key: ours -> theirs)."""
    expected = model.state_dict()
    for ours, (theirs, value) in named.items():
        if ours not in expected:
            raise LoadError(f"{source}: unexpected key '{theirs}' (not part of {kind})")
        if not torch.is_tensor(value) or value.shape != expected[ours].shape:
            shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
            raise LoadError(f"{source}: key '{theirs}' has shape {shape}, expected {tuple(expected[ours].shape)}")
    missing = [their_key(k) for k in expected if k not in named and not k.endswith("num_batches_tracked")]
    if missing:
        raise LoadError(f"{source}: missing key '{missing[0]}' ({len(missing)} missing in all)")
    model.load_state_dict({ours: value for ours, (_, value) in named.items()}, strict=False)


# -----------------------------------------------------------------------------
# torchvision's ImageNet weights for the backbone (train.py's pretrained_backbone)


def load_imagenet_backbone(model):
    """Load the ImageNet weights the paper starts from (torchvision's IMAGENET1K_V1) into model.backbone:
    every stage it keeps (feature_stride may stop it early), or one clear error."""
    name = model.config["backbone"]
    weights = torchvision.models.get_model_weights(name).IMAGENET1K_V1
    try:
        state_dict = weights.get_state_dict(progress=True)
    except Exception as e:  # no network, a proxy, a truncated file: all end here
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
        raise LoadError(
            f"could not get ImageNet weights for {name} ({type(e).__name__}); download {weights.url} "
            f"to {path}, or train without them (pretrained_backbone=False)"
        ) from None
    own = model.backbone.state_dict()
    model.backbone.load_state_dict({k: v for k, v in state_dict.items() if k in own})


# -----------------------------------------------------------------------------
# Official facebookresearch/detr checkpoints: key names and architecture
# The module names differ from the official code's, and official_to_minidetr_key maps its keys onto
# detr.py's, so that the official COCO models load as they are and reproduce their outputs.

# the official models' 91 outputs: output i is COCO category id i (N/A: ids that COCO leaves unused)
COCO_CLASSES = [
    "N/A", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "N/A", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "N/A", "backpack", "umbrella", "N/A", "N/A", "handbag", "tie",
    "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "N/A", "wine glass", "cup", "fork", "knife", "spoon",
    "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake",
    "chair", "couch", "potted plant", "bed", "N/A", "dining table", "N/A", "N/A", "toilet", "N/A", "tv", "laptop",
    "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "N/A",
    "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
]
OFFICIAL_CHECKPOINTS = {
    "detr-r50": "https://dl.fbaipublicfiles.com/detr/detr-r50-e632da11.pth",
    "detr-r50-dc5": "https://dl.fbaipublicfiles.com/detr/detr-r50-dc5-f0fb7ef5.pth",
    "detr-r101": "https://dl.fbaipublicfiles.com/detr/detr-r101-2c7b67e5.pth",
    "detr-r101-dc5": "https://dl.fbaipublicfiles.com/detr/detr-r101-dc5-a2e86def.pth",
}

# official key prefix -> ours; and whole dotted parts renamed anywhere in a key
KEY_PREFIXES = [
    ("backbone.0.body.", "backbone."),
    ("transformer.encoder.layers.", "encoder."),
    ("transformer.decoder.layers.", "decoder."),
    ("transformer.decoder.norm.", "decoder_norm."),
    ("class_embed.", "class_head."),
    ("bbox_embed.layers.", "box_head."),
]
KEY_PARTS = {"multihead_attn": "cross_attn"}


def official_to_minidetr_key(key):
    for official, ours in KEY_PREFIXES:
        if key.startswith(official):
            key = ours + key[len(official) :]
            break
    return ".".join(KEY_PARTS.get(part, part) for part in key.split("."))


def minidetr_to_official_key(key):
    for official, ours in KEY_PREFIXES:
        if key.startswith(ours):
            key = official + key[len(ours) :]
            break
    renamed = {ours: official for official, ours in KEY_PARTS.items()}
    return ".".join(renamed.get(part, part) for part in key.split("."))


def official_model_args(state_dict, source):
    """Read the architecture off an official state dict (the number of heads is not in the weights:
    the official models all use 8)."""
    try:
        num_queries, hidden_dim = state_dict["query_embed.weight"].shape
        blocks = {k.split(".")[4] for k in state_dict if k.startswith("backbone.0.body.layer3.")}
        bottleneck = "backbone.0.body.layer1.0.conv3.weight" in state_dict
        backbone = {(False, 2): "resnet18", (False, 6): "resnet34", (True, 6): "resnet50", (True, 23): "resnet101"}
        return dict(
            num_classes=state_dict["class_embed.weight"].shape[0] - 1,
            backbone=backbone[(bottleneck, len(blocks))],
            hidden_dim=hidden_dim,
            num_queries=num_queries,
            num_encoder_layers=len({k.split(".")[3] for k in state_dict
                                    if k.startswith("transformer.encoder.layers.")}),
            num_decoder_layers=len({k.split(".")[3] for k in state_dict
                                    if k.startswith("transformer.decoder.layers.")}),
            dim_feedforward=state_dict["transformer.encoder.layers.0.linear1.weight"].shape[0],
        )
    except (KeyError, AttributeError, ValueError, TypeError) as e:
        raise LoadError(f"{source}: not an official DETR checkpoint (cannot read the architecture: {e!r})") from None


def download_official_checkpoint(name):
    """An official checkpoint by name, downloaded (and cached) by torch.hub, or one line saying where to put it."""
    url = OFFICIAL_CHECKPOINTS[name]
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", check_hash=True)
    except Exception as e:
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
        raise LoadError(f"could not download {url} ({type(e).__name__}); put the file at {path}") from None


def model_from_official_checkpoint(checkpoint, source, **overrides):
    """The DETR of an official checkpoint already read ({'model': state dict}, or the state dict), with
    COCO's class names when it has COCO's 91 outputs."""
    state_dict = checkpoint.get("model", checkpoint)
    model = build_model(**{**official_model_args(state_dict, source), **overrides})
    load_official_state_dict(model, state_dict, source)
    model.classes = COCO_CLASSES if model.num_classes == len(COCO_CLASSES) else None
    return model


def load_official_state_dict(model, state_dict, source="checkpoint"):
    """Load a state dict with the official key names into model (see load_named_state_dict)."""
    named = {official_to_minidetr_key(k): (k, v) for k, v in state_dict.items()
             if not k.endswith("num_batches_tracked")}
    load_named_state_dict(model, named, source, "an official DETR checkpoint", minidetr_to_official_key)


# -----------------------------------------------------------------------------
# minidetr checkpoints: what train.py writes (out_dir/ckpt.pt and best.pt)
# A checkpoint is a dict: model (the state dict), model_args (DETR's arguments, enough to rebuild it),
# classes (the names of its outputs), category_ids (the dataset's own id of each class, or None),
# config (train.py's whole config), ema_model (with ema_decay: the averaged weights, which evaluation,
# best.pt and every later use take), and for an exact resume optimizer (its state dict), scaler (the
# float16 loss scaler's, {} without), iter_num, best_val (the best val metric so far), best_iter (its
# iteration), rng (every process's CPU and CUDA generator states), cpu_threads (torch's threads, which a
# resume on the CPU takes again: another count sums in another order) and evaluation_due (True when a
# signal cut the evaluation at iter_num short: the resume evaluates first).
# Every file is read with weights_only=True: a checkpoint runs no code.


def model_from_checkpoint(checkpoint, source, ema=True, **overrides):
    """The model of a minidetr checkpoint (train.py's ckpt.pt / best.pt: model_args and model, or with
    ema its averaged weights ema_model where it has them), or one line (LoadError) saying why its
    weights do not make one."""
    missing = [k for k in ("model", "model_args") if k not in checkpoint]
    if missing:
        raise LoadError(f"{source}: not a minidetr checkpoint (no '{missing[0]}')")
    try:
        model = build_model(**{**checkpoint["model_args"], **overrides})
        model.load_state_dict(checkpoint["ema_model"] if ema and "ema_model" in checkpoint else checkpoint["model"])
    except (TypeError, ValueError, RuntimeError) as e:
        detail = [line.strip() for line in str(e).strip().splitlines()][-1][:300]
        raise LoadError(f"{source}: its weights do not make a model ({detail})") from None
    model.classes, model.category_ids = checkpoint.get("classes"), checkpoint.get("category_ids")
    return model


def load_checkpoint_file(path):
    """torch.load that fails with one line: a missing file, or a file that is no checkpoint."""
    if not os.path.isfile(path):
        known = ", ".join(OFFICIAL_CHECKPOINTS)
        raise LoadError(f"no checkpoint file at '{path}' (known names: {known})")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise LoadError(f"{path}: not a PyTorch checkpoint ({first_line(e)})") from None
    if not isinstance(ckpt, dict):
        raise LoadError(f"{path}: not a checkpoint (holds a {type(ckpt).__name__}, expected a dict)")
    return ckpt


def first_line(error):
    """An exception as one short line: its type and the first line of its message."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__


def write_checkpoint(checkpoint, path):
    """Write to a temporary file, then rename: a run killed mid-write leaves the old file whole. A
    failed write (a full disk, no permission, a vanished folder) removes the temporary file and
    stops with one error line; the previous checkpoint is left as it was."""
    tmp = path + ".tmp"
    try:
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        if os.path.exists(tmp):
            os.remove(tmp)
        if "DataLoader worker" in str(e):  # a data worker killed meanwhile (SIGCHLD), not a failed write
            raise
        folder = os.path.dirname(os.path.abspath(path))
        needed = sum(t.nbytes for t in torch.utils._pytree.tree_leaves(checkpoint) if isinstance(t, torch.Tensor))
        free = shutil.disk_usage(folder).free if os.path.isdir(folder) else 0
        raise SystemExit(f"error: could not write {path} ({str(e).splitlines()[0]}); it needs about "
                         f"{needed / 2**30:.2f} GiB, {free / 2**30:.2f} GiB are free there. The last checkpoint is "
                         f"left as it was") from None


def load_training_checkpoint(path, classes):
    """train.py's out_dir/ckpt.pt for a resume: every key an exact resume needs, and the dataset's classes."""
    checkpoint = load_checkpoint_file(path)
    missing = [k for k in ("model", "optimizer", "model_args", "iter_num", "best_val", "classes", "rng")
               if k not in checkpoint]
    if missing:
        raise LoadError(f"{path} is not a minidetr training checkpoint (no '{missing[0]}')")
    if checkpoint["classes"] != classes:
        raise LoadError(f"{path} was trained on classes {checkpoint['classes']}, not {classes}")
    return checkpoint


RUN_FILES = ("ckpt.pt", "best.pt", "log.jsonl")  # what a run writes in out_dir, and a new run never overwrites


def check_out_dir(cfg, master):
    """Before a run writes anything. A fresh run into an out_dir that holds another run's files stops with one
    line that gives the choices, or with overwrite=True deletes them first, so that log.jsonl holds one run
    only; the master then checks that out_dir can be written (one error line, before any training)."""
    found = [f for f in RUN_FILES if os.path.exists(os.path.join(cfg.out_dir, f))]
    if any(os.path.realpath(os.path.join(cfg.out_dir, f)) == os.path.realpath(cfg.init_from) for f in found):
        raise SystemExit(f"error: init_from={cfg.init_from} is in out_dir={cfg.out_dir}, which a new run starts anew: "
                         f"give another --out_dir" if master else 1)
    if found and cfg.init_from != "resume" and not cfg.overwrite:
        raise SystemExit(f"error: out_dir={cfg.out_dir} holds a run ({', '.join(found)}); resume it with "
                         f"--init_from=resume, give another --out_dir, or delete it and start over with --overwrite"
                         if master else 1)  # the master's line says why
    if master:
        for f in found if cfg.init_from != "resume" else ():
            os.remove(os.path.join(cfg.out_dir, f))
        # one error line before any training when out_dir cannot be written: a run must be able to save what it learns
        try:
            os.makedirs(cfg.out_dir, exist_ok=True)
            with open(os.path.join(cfg.out_dir, ".writable"), "w"):
                pass
            os.remove(os.path.join(cfg.out_dir, ".writable"))
        except OSError as e:
            raise SystemExit(f"error: out_dir={cfg.out_dir!r} is not writable ({e.strerror or e})") from None


def cut_log(out_dir, iter_num):
    """A resume drops log.jsonl's records past its checkpoint's iteration: it trains those steps again."""
    path = os.path.join(out_dir, "log.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            lines = [line for line in f if json.loads(line)["iter"] <= iter_num]
        with open(path, "w") as f:
            f.writelines(lines)


def append_log(out_dir, record, writer=None, classes=()):
    """One line of out_dir/log.jsonl; with a TensorBoard writer, each of its numbers too (the per-class APs by
    class name). A failed append (a full disk) is one error line."""
    path = os.path.join(out_dir, "log.jsonl")
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        raise SystemExit(f"error: could not append to {path} ({e.strerror or e}); "
                         f"the last checkpoint is left as it was") from None
    for key, value in record.items() if writer is not None else ():
        for name, x in zip(classes, value) if isinstance(value, list) else [(None, value)]:
            if key != "iter" and isinstance(x, (int, float)) and math.isfinite(x):
                writer.add_scalar(key if name is None else f"{key}/{name}", x, record["iter"])


# Fine-tuning (train.py's init_from): a pretrained model's weights into the config's model
# The architecture the transfer refuses another value of
# (num_heads and dilation shape no tensor, but change what they mean)
ARCHITECTURE_KEYS = ("backbone", "dilation", "hidden_dim", "num_heads", "num_encoder_layers", "num_decoder_layers",
                     "dim_feedforward", "num_queries", "feature_stride")


def transfer_weights(pretrained, model, source):
    """Copy into model (built from train.py's config for the dataset's classes, model.classes) every
    tensor of the pretrained model (load_model's) that it has too, and return what it did: the parts
    (AdditionsDETR.PARTS) that got pretrained tensors (loaded), those that start as new (new), those of the
    pretrained model that the config's has not (left_out), the model's classes that start with fresh
    rows (new_classes) and the pretrained classes whose rows are dropped (dropped_classes).
    - The architecture must be the same (ARCHITECTURE_KEYS but those the file does not say, then
      every tensor's shape): anything else is one LoadError naming the first setting or key that differs.
    - The class-shaped tensors (the class heads' rows and the denoising label embedding) are copied
      row by row for the classes of the same name (data/format.class_key: case aside, VOC's names as
      COCO's), "no object" too when any class is; new classes keep fresh rows. Class heads trained
      with another kind of score (cls_loss: a softmax with "no object", or sigmoids) start new.
    - An addition's own modules that the pretrained model lacks start as new; those it has and the
      config switches off are left out. The object queries are loaded when they mean the same
      (DETR's positions, or DAB-DETR's content with anchor_queries), as many groups as both have, and
      so is the box head (an absolute box in DETR, an offset of the anchor box with anchor_queries)."""
    theirs_args, ours_args = model_args(pretrained), model_args(model)
    for key in ARCHITECTURE_KEYS:
        if key not in getattr(pretrained, "assumed", ()) and theirs_args[key] != ours_args[key]:
            raise LoadError(f"{source} is a DETR with {key}={theirs_args[key]!r}, the config has "
                            f"{key}={ours_args[key]!r}: set --{key}={theirs_args[key]!r} to fine-tune it")
    part_of = {attr: part for part, attrs in AdditionsDETR.PARTS.items() for attr in attrs}
    additions = {attr for part, attrs in AdditionsDETR.PARTS.items() if part not in DETR.PARTS for attr in attrs}
    theirs_sigmoid, ours_sigmoid = theirs_args["cls_loss"] != "ce", ours_args["cls_loss"] != "ce"  # addition 6
    theirs, ours = pretrained.state_dict(), model.state_dict()
    names = [class_key(c) for c in pretrained.classes or []]
    rows = {i: names.index(class_key(c))  # ours -> theirs
            for i, c in enumerate(model.classes) if class_key(c) in names}
    same_queries = theirs_args["anchor_queries"] == ours_args["anchor_queries"]  # queries and box head mean the same
    loaded, new = set(), set()
    with torch.no_grad():
        for key, value in ours.items():
            attr, part = key.split(".")[0], part_of[key.split(".")[0]]
            if key.endswith("num_batches_tracked"):
                continue
            if key not in theirs:
                if attr not in additions:
                    raise LoadError(f"{source} has no '{key}': it is another architecture than the config's")
                new.add(part)
            elif attr in ("class_head", "proposal_class_head") and theirs_sigmoid != ours_sigmoid:
                new.add(part)  # softmax rows with "no object" and sigmoid rows without mean different scores (cls_loss)
            elif attr in ("class_head", "proposal_class_head", "label_embed"):  # rows by class name
                for i, j in rows.items():
                    value[i] = theirs[key][j]
                if rows and attr != "label_embed" and not ours_sigmoid:  # "no object", the last row
                    value[-1] = theirs[key][-1]
                (loaded if rows else new).add(part)
                if len(rows) < len(model.classes):
                    new.add(part)
            elif attr == "box_head" and not same_queries:
                new.add(part)
            elif attr in ("query_embed", "anchor_embed"):  # (num_queries x groups, ...)
                if attr == "query_embed" and not same_queries:
                    new.add(part)
                    continue
                n = min(len(value), len(theirs[key]))
                value[:n] = theirs[key][:n]
                loaded.add(part)
                if n < len(value):
                    new.add(part)
            elif value.shape != theirs[key].shape:
                raise LoadError(f"{source}: key '{key}' has shape {tuple(theirs[key].shape)}, the config's model "
                                f"{tuple(value.shape)}: it is another architecture")
            else:
                value.copy_(theirs[key])
                loaded.add(part)
        unknown = next((k for k in theirs if k.split(".")[0] not in additions and k not in ours
                        and not k.endswith("num_batches_tracked")), None)
        if unknown:
            raise LoadError(f"{source} has '{unknown}', which the config's model has not: it is another architecture")
    order = list(AdditionsDETR.PARTS)
    left_out = {part_of[k.split(".")[0]] for k in theirs if k.split(".")[0] in additions and k not in ours}
    return {"loaded": sorted(loaded, key=order.index), "new": sorted(new, key=order.index),
            "left_out": sorted(left_out, key=order.index),
            "new_classes": [c for i, c in enumerate(model.classes) if i not in rows],
            "dropped_classes": [c for j, c in enumerate(pretrained.classes or [])
                                if j not in rows.values() and c != "N/A"]}


def checkpoint_architecture(path):
    """A minidetr checkpoint's architecture (DETR's arguments but num_classes: its model_args), else {}: an
    official or transformers model says its own, and a bad file is initial_model's one error line."""
    try:
        checkpoint = load_checkpoint_file(path) if os.path.isfile(path) else {}
    except LoadError:
        return {}
    training = ("num_classes", "trainable_layers", "dropout")  # the dataset's and the run's, not the architecture
    return {k: v for k, v in checkpoint.get("model_args", {}).items() if k not in training}


def few(names):
    """The first ten names, and how many more."""
    return ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")


def new_model(cfg, num_classes, trainable_layers, pretrained_backbone=None):
    """A new DETR with the config's model keys (they are named as the model's arguments), its backbone from
    ImageNet's weights with pretrained_backbone (the config's unless given)."""
    args = {k: getattr(cfg, k) for k in [*inspect.signature(DETR).parameters, *ADDITIONS_OFF] if hasattr(cfg, k)}
    model = build_model(**{**args, "num_classes": num_classes, "trainable_layers": trainable_layers})
    if cfg.pretrained_backbone if pretrained_backbone is None else pretrained_backbone:
        load_imagenet_backbone(model)
    return model


def initial_model(cfg, classes):
    """(model, checkpoint or None), as init_from says: resumed from out_dir/ckpt.pt, new, or the config's
    model with every tensor it shares with pretrained weights (weights.transfer_weights)."""
    trainable_layers = cfg.trainable_layers if cfg.lr_backbone > 0 else 0  # lr_backbone=0 freezes the backbone
    if cfg.init_from == "scratch":
        return new_model(cfg, len(classes), trainable_layers), None
    if cfg.init_from != "resume":  # fine-tuning: a fresh optimizer from iteration 0
        model = new_model(cfg, len(classes), trainable_layers, pretrained_backbone=False)
        model.classes = classes
        pretrained = load_model(cfg.init_from)[0]
        done, say = transfer_weights(pretrained, model, cfg.init_from), f"init_from={cfg.init_from}:"
        if os.environ.get("RANK", "0") != "0":  # the master says it
            return model, None
        kept, new_classes, dropped = (len(classes) - len(done["new_classes"]), done["new_classes"],
                                      done["dropped_classes"])
        print(f"{say} loaded {', '.join(done['loaded'])}; "
              f"the class rows of {kept} of the {len(classes)} classes (by name)")
        print(f"{say} new {', '.join(done['new']) or 'nothing'}"
              + (f"; rows for {few(new_classes)}" if new_classes else ""))
        print(f"{say} left out {', '.join(done['left_out']) or 'no module'}"
              + (f"; dropped the class rows of {few(dropped)} (not in this data)" if dropped else ""))
        return model, None
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    if not os.path.isfile(ckpt_path):
        raise SystemExit(f"error: init_from='resume' but there is no {ckpt_path}")
    checkpoint = load_training_checkpoint(ckpt_path, classes)
    if checkpoint["iter_num"] >= cfg.max_iters and not cfg.eval_only and not checkpoint.get("evaluation_due"):
        raise SystemExit(f"error: {ckpt_path} is already at iteration {checkpoint['iter_num']}; raise "
                         f"max_iters={cfg.max_iters} to go on")
    return model_from_checkpoint(checkpoint, ckpt_path, ema=False), checkpoint


# -----------------------------------------------------------------------------
# Hugging Face transformers checkpoints: folders and hub ids, in and out
# transformers' DetrForObjectDetection is a port of the official model under other names. Its files
# (save_pretrained, the hub) call the backbone model.backbone.conv_encoder.model.* (timm's ResNet,
# whose names are torchvision's, or transformers' own ResNet: embedder / encoder.stages), the
# feed-forward layers fc1 / fc2, and split each attention's input projection into q_proj, k_proj
# and v_proj. transformers 5's in-memory state dict says backbone.model, mlp.fc1 and o_proj instead.
# Both load; folders are written with the file names, which every transformers version reads.

HF_NEWER_NAMES = [(".backbone.model.", ".backbone.conv_encoder.model."), (".mlp.fc", ".fc"), (".o_proj.", ".out_proj.")]
HF_PREFIXES = [  # transformers' prefix -> ours
    ("model.backbone.conv_encoder.model.", "backbone."),
    ("model.input_projection.", "input_proj."),
    ("model.query_position_embeddings.", "query_embed."),
    ("model.encoder.layers.", "encoder."),
    ("model.decoder.layers.", "decoder."),
    ("model.decoder.layernorm.", "decoder_norm."),
    ("class_labels_classifier.", "class_head."),
    ("bbox_predictor.layers.", "box_head."),
]
HF_LAYER_PARTS = {  # inside our encoder.i / decoder.i: transformers' module name -> ours
    "encoder": {"self_attn_layer_norm": "norm1", "final_layer_norm": "norm2", "fc1": "linear1", "fc2": "linear2"},
    "decoder": {"self_attn_layer_norm": "norm1", "encoder_attn": "cross_attn", "encoder_attn_layer_norm": "norm2",
                "final_layer_norm": "norm3", "fc1": "linear1", "fc2": "linear2"},
}
HF_RESNET_NAMES = [  # transformers' own ResNet -> torchvision's names
    (r"^embedder\.embedder\.convolution\.", "conv1."),
    (r"^embedder\.embedder\.normalization\.", "bn1."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.convolution\.",
     lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.0."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.normalization\.",
     lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.1."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.convolution\.",
     lambda m: f"layer{int(m[1]) + 1}.{m[2]}.conv{int(m[3]) + 1}."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.normalization\.",
     lambda m: f"layer{int(m[1]) + 1}.{m[2]}.bn{int(m[3]) + 1}."),
]


def hf_to_minidetr_key(key):
    """A transformers key (either generation) -> ours; q/k/v projections keep their own names here.
    None for a key that is not part of DetrForObjectDetection."""
    for newer, older in HF_NEWER_NAMES:
        key = key.replace(newer, older)
    prefix = next((p for p in HF_PREFIXES if key.startswith(p[0])), None)
    if prefix is None:
        return None
    key = prefix[1] + key[len(prefix[0]):]
    names = key.split(".")
    if names[0] in HF_LAYER_PARTS and len(names) > 2:
        names[2] = HF_LAYER_PARTS[names[0]].get(names[2], names[2])
    if names[0] == "backbone":
        rest = ".".join(names[1:])
        for pattern, ours in HF_RESNET_NAMES:
            rest = re.sub(pattern, ours, rest)
        names = ["backbone", rest]
    return ".".join(names)


def minidetr_to_hf_key(key):
    """Our key -> the name transformers writes to disk (timm's backbone names, as the hub's models)."""
    names = key.split(".")
    if names[0] in HF_LAYER_PARTS and len(names) > 2:
        names[2] = {ours: theirs for theirs, ours in HF_LAYER_PARTS[names[0]].items()}.get(names[2], names[2])
    key = ".".join(names)
    theirs, ours = next(p for p in HF_PREFIXES if key.startswith(p[1]))
    return theirs + key[len(ours):]


def hf_to_minidetr(state_dict, source):
    """A transformers state dict -> {our key: (its key, tensor)}, q/k/v joined into one in_proj."""
    named = {}
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):  # written by plain BatchNorm, unused when frozen
            continue
        ours = hf_to_minidetr_key(key)
        if ours is None:
            raise LoadError(f"{source}: unexpected key '{key}' (not part of transformers' DetrForObjectDetection)")
        named[ours] = (key, value)
    for q in [k for k in named if ".q_proj." in k]:
        attn, kind = q.split(".q_proj.")
        keys = [f"{attn}.{p}_proj.{kind}" for p in "qkv"]
        if not all(k in named for k in keys):
            missing = next(named[q][0].replace(".q_proj.", f".{k.split('.')[-2]}.") for k in keys if k not in named)
            raise LoadError(f"{source}: missing key '{missing}'")
        named[f"{attn}.in_proj_{kind}"] = (named[q][0], torch.cat([named.pop(k)[1] for k in keys]))
    return named


def minidetr_to_hf(state_dict):
    """Our state dict -> transformers' on-disk names, each in_proj split into q_proj, k_proj, v_proj."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        if ".in_proj_" in key:
            attn, kind = key.split(".in_proj_")
            for p, part in zip("qkv", value.chunk(3)):
                out[minidetr_to_hf_key(f"{attn}.{p}_proj.{kind}")] = part.clone()
        else:
            out[minidetr_to_hf_key(key)] = value.clone()
    return out


def hf_model_args(config, source, num_outputs):
    """DETR's arguments, the class names and category_ids from a transformers config.json (DetrConfig's
    defaults where a key is absent), or one line saying what minidetr cannot build. num_outputs: the
    class head's rows in the weights (the class count when config.json names none)."""
    def refuse(what):
        raise LoadError(f"{source}: {what}; minidetr builds transformers' DetrForObjectDetection with a "
                        f"sine position encoding and a ResNet-18/34/50/101 backbone")

    def number(key, default, kind=int):
        value = config.get(key, default)
        if not isinstance(value, kind) or isinstance(value, bool) or value < 0:
            raise LoadError(f"{source}: config.json's {key} is {value!r}, not a number >= 0")
        return value

    if config.get("model_type") != "detr":
        refuse(f"model_type is {config.get('model_type')!r}, not 'detr'")
    architectures = config.get("architectures") or ["DetrForObjectDetection"]
    architecture = architectures if isinstance(architectures, str) else architectures[0]
    if architecture != "DetrForObjectDetection":
        refuse(f"the model is a {architecture}")
    for key, paper in (("position_embedding_type", "sine"), ("activation_function", "relu"), ("num_channels", 3)):
        if config.get(key, paper) != paper:
            refuse(f"{key} is {config[key]!r}, not {paper!r}")
    for a, b, default in (("encoder_attention_heads", "decoder_attention_heads", 8),
                          ("encoder_ffn_dim", "decoder_ffn_dim", 2048)):
        if config.get(a, default) != config.get(b, default):
            refuse(f"{a} ({config.get(a, default)}) and {b} ({config.get(b, default)}) differ")
    args = dict(hidden_dim=number("d_model", 256), num_heads=number("encoder_attention_heads", 8),
                num_encoder_layers=number("encoder_layers", 6), num_decoder_layers=number("decoder_layers", 6),
                dim_feedforward=number("encoder_ffn_dim", 2048), num_queries=number("num_queries", 100),
                # transformers' attention and activation dropouts are not DETR's
                dropout=number("dropout", 0.1, (int, float)))

    # the backbone, as transformers builds it: a backbone_config decides alone, else the top-level keys
    backbone_config = config.get("backbone_config")
    if backbone_config is not None and not isinstance(backbone_config, dict):
        refuse(f"backbone_config is {backbone_config!r}, not a dict")
    if backbone_config:
        kind, stride = backbone_config.get("model_type"), backbone_config.get("output_stride")
    else:  # transformers 4's config.json (the hub's): timm unless use_timm_backbone is false
        kind = "timm_backbone" if config.get("use_timm_backbone", True) else "resnet"
        backbone_kwargs = config.get("backbone_kwargs") if isinstance(config.get("backbone_kwargs"), dict) else {}
        stride = backbone_kwargs.get("output_stride") or (16 if config.get("dilation") else None)
        backbone_config = {}
    if stride not in (None, 32, 16):
        refuse(f"its backbone has output_stride {stride}: DETR's stages end at stride 32, or 16 dilated (DC5)")
    if kind == "timm_backbone":  # a timm model name, e.g. 'resnet50' or 'timm/resnet50.a1_in1k'
        name = (backbone_config.get("backbone") or config.get("backbone") or "resnet50").split("/")[-1].split(".")[0]
        last_stage = (backbone_config.get("out_indices") or [4])[-1]
    elif kind == "resnet":  # transformers' ResNet: read its depth off the blocks
        layer_type, depths = (backbone_config.get("layer_type", "bottleneck"),
                              backbone_config.get("depths", [3, 4, 6, 3]))
        name = {("basic", (2, 2, 2, 2)): "resnet18", ("basic", (3, 4, 6, 3)): "resnet34",
                ("bottleneck", (3, 4, 6, 3)): "resnet50", ("bottleneck", (3, 4, 23, 3)): "resnet101"}.get(
                    (layer_type, tuple(depths)), f"a {layer_type} ResNet of depths {depths}")
        last_stage = int(str((backbone_config.get("out_features") or ["stage4"])[-1]).removeprefix("stage"))
        for key, torchvision_value in (("embedding_size", 64), ("downsample_in_bottleneck", False),
                                       ("hidden_act", "relu"), ("downsample_in_first_stage", False),
                                       ("num_channels", 3)):
            if backbone_config.get(key, torchvision_value) != torchvision_value:
                refuse(f"its ResNet has {key}={backbone_config[key]!r}, torchvision's {torchvision_value!r}")
        if stride == 16:
            refuse("dilation with transformers' own ResNet")
    else:
        refuse(f"the backbone is a {kind!r}")
    if name not in BACKBONES:
        refuse(f"the backbone is {name!r}")
    if last_stage != 4:
        refuse(f"its features come from ResNet stage {last_stage}, not the last (4)")
    if stride == 16 and name in ("resnet18", "resnet34"):
        refuse(f"dilation (DC5) with {name}, which torchvision's basic blocks cannot dilate")

    # the classes: id2label's names in output order, else as many as the class head has rows
    id2label = config.get("id2label") or {i: f"LABEL_{i}" for i in range(config.get("num_labels") or num_outputs - 1)}
    try:
        id2label = {int(i): str(name) for i, name in id2label.items()}
    except (AttributeError, TypeError, ValueError):
        raise LoadError(f"{source}: config.json's id2label is not a mapping of class numbers to names") from None
    if sorted(id2label) != list(range(len(id2label))):
        raise LoadError(f"{source}: config.json's id2label does not number its classes 0, 1, 2, ...")
    classes = [id2label[i] for i in range(len(id2label))]
    category_ids = config.get("category_ids")  # written by minidetr: a dataset's own ids of the classes
    if category_ids is not None and not (isinstance(category_ids, list) and len(category_ids) == len(classes)
                                         and all(isinstance(i, int) and not isinstance(i, bool) for i in category_ids)):
        raise LoadError(f"{source}: config.json's category_ids should be {len(classes)} integers, one per class")
    return dict(num_classes=len(classes), backbone=name, dilation=stride == 16, **args), classes, category_ids


def hf_cache_folder():
    """The Hugging Face hub cache, where huggingface_hub would put a download."""
    home = os.environ.get("HF_HOME", os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                                                  "huggingface"))
    return os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")


def has_transformers_weights(folder):
    return any(os.path.isfile(os.path.join(folder, name)) for name in ("model.safetensors", "pytorch_model.bin"))


def fetch_transformers_folder(name_or_path):
    """The local folder of a transformers model: the folder itself, or a hub id's snapshot from the
    local Hugging Face cache (with its config and weights), else downloaded with huggingface_hub
    when it is installed. None when the name is a file (or looks like one): an official checkpoint."""
    if os.path.isdir(name_or_path):
        return name_or_path
    if os.path.exists(name_or_path) or not re.fullmatch(r"[\w.-]+/[\w.-]+", name_or_path) \
            or name_or_path.endswith((".pt", ".pth", ".bin", ".safetensors")):
        return None
    cache = hf_cache_folder()
    repo = os.path.join(cache, "models--" + name_or_path.replace("/", "--"))
    try:
        with open(os.path.join(repo, "refs", "main")) as f:
            snapshot = os.path.join(repo, "snapshots", f.read().strip())
        if os.path.isfile(os.path.join(snapshot, "config.json")) and has_transformers_weights(snapshot):
            return snapshot
    except OSError:
        pass
    try:
        import huggingface_hub
    except ImportError:
        raise LoadError(f"'{name_or_path}' is no local file or folder, nor in the Hugging Face cache ({cache}): "
                        f"pip install huggingface_hub to download it, or give the folder that holds its config.json "
                        f"and model.safetensors") from None
    weights = (["model.safetensors", "pytorch_model.bin"] if importlib.util.find_spec("safetensors")
               else ["pytorch_model.bin"])
    try:
        for name in weights:  # the first the repository has; older ones hold only pytorch_model.bin
            folder = huggingface_hub.snapshot_download(name_or_path, allow_patterns=["*.json", name])
            if has_transformers_weights(folder):
                return folder
        return folder
    except Exception as e:
        raise LoadError(f"could not download '{name_or_path}' from the Hugging Face hub ({first_line(e)})") from None


def model_from_transformers_folder(folder, source, **overrides):
    """The DETR of a transformers folder: config.json gives the architecture and classes."""
    try:
        with open(os.path.join(folder, "config.json")) as f:
            config = json.load(f)
    except FileNotFoundError:
        hint = next((f"; for a training run's folder give its {n}" for n in ("best.pt", "ckpt.pt")
                     if os.path.isfile(os.path.join(folder, n))),
                    " (a transformers model folder holds config.json and model.safetensors)")
        raise LoadError(f"{source}: no config.json in {folder}{hint}") from None
    except (OSError, ValueError) as e:
        raise LoadError(f"{source}: config.json is not readable json ({e})") from None
    if not isinstance(config, dict):
        raise LoadError(f"{source}: config.json holds no settings")
    weights = read_transformers_weights(folder, source)
    head = weights.get("class_labels_classifier.bias")
    args, classes, category_ids = hf_model_args(config, source, len(head) if torch.is_tensor(head) else 92)
    try:
        model = build_model(**{**args, **overrides})
    except (TypeError, ValueError) as e:
        raise LoadError(f"{source}: config.json describes no DETR minidetr can build ({e})") from None
    load_named_state_dict(model, hf_to_minidetr(weights, source), source, "transformers' DetrForObjectDetection",
                          minidetr_to_hf_key)
    model.classes, model.category_ids = classes, category_ids
    return model


def transformers_image_size(folder):
    """(shortest side, longest side) from a transformers folder's preprocessor_config.json, else DETR's (800, 1333)."""
    try:
        with open(os.path.join(folder, "preprocessor_config.json")) as f:
            size = json.load(f).get("size") or {}
        if isinstance(size.get("shortest_edge"), int) and isinstance(size.get("longest_edge"), int):
            return size["shortest_edge"], size["longest_edge"]
    except (OSError, ValueError, AttributeError):
        pass
    return 800, 1333


def read_transformers_weights(folder, source):
    """The state dict of model.safetensors (read with the safetensors package), else of pytorch_model.bin."""
    safetensors_file, bin_file = os.path.join(folder, "model.safetensors"), os.path.join(folder, "pytorch_model.bin")
    if os.path.isfile(safetensors_file) and (importlib.util.find_spec("safetensors") or not os.path.isfile(bin_file)):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise LoadError(f"{source}: pip install safetensors to read {safetensors_file}") from None
        try:
            return load_file(safetensors_file)
        except Exception as e:
            raise LoadError(f"{safetensors_file}: not a readable safetensors file ({first_line(e)})") from None
    if os.path.isfile(bin_file):
        return load_checkpoint_file(bin_file)
    raise LoadError(f"{source}: no model.safetensors or pytorch_model.bin in {folder}")


def write_transformers_folder(model, folder, val_scale=800, max_size=1333):
    """Write a model with no addition switched on as a transformers folder: config.json (the classes
    as id2label, a dataset's own ids as category_ids), model.safetensors (needs the safetensors
    package) and preprocessor_config.json (the image sizes). DetrForObjectDetection.from_pretrained
    then gives the same outputs."""
    c = model_args(model)
    on = [k for k in ("anchor_queries", "encoder_proposals", "denoising_groups", "conditional_cross_attn") if c[k]]
    # transformers' DETR reads a softmax with "no object"
    on += [f"cls_loss={c['cls_loss']!r}"] * (c["cls_loss"] != "ce")
    on += ["query_groups"] * (c["query_groups"] > 1) + ["feature_stride"] * (c["feature_stride"] != 32)
    if on:
        raise LoadError(f"the model uses {', '.join(on)}, which transformers' DETR does not have: "
                        f"only a model with no addition switched on can be written for it")
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise LoadError("pip install safetensors to write model.safetensors") from None
    classes = model.classes or [f"LABEL_{i}" for i in range(model.num_classes)]
    config = dict(
        model_type="detr", architectures=["DetrForObjectDetection"], id2label=dict(enumerate(classes)),
        label2id={name: i for i, name in enumerate(classes)}, backbone=c["backbone"], use_timm_backbone=True,
        use_pretrained_backbone=False, backbone_config=None, dilation=c["dilation"], num_channels=3,
        d_model=c["hidden_dim"], encoder_layers=c["num_encoder_layers"], decoder_layers=c["num_decoder_layers"],
        encoder_attention_heads=c["num_heads"], decoder_attention_heads=c["num_heads"],
        encoder_ffn_dim=c["dim_feedforward"], decoder_ffn_dim=c["dim_feedforward"], num_queries=c["num_queries"],
        dropout=c["dropout"], attention_dropout=c["dropout"], activation_dropout=c["dropout"],  # all DETR's dropouts
        activation_function="relu", position_embedding_type="sine", auxiliary_loss=False,
    )
    if model.category_ids is not None:
        if len(model.category_ids) != model.num_classes:
            raise LoadError(f"the model has {model.num_classes} classes but {len(model.category_ids)} category_ids")
        config["category_ids"] = list(model.category_ids)
    preprocessor = dict(  # DETR's own: resize the shorter side, ImageNet mean and std, pad
        image_processor_type="DetrImageProcessor", format="coco_detection", do_resize=True,
        size={"shortest_edge": val_scale, "longest_edge": max_size}, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225], do_pad=True,
    )
    os.makedirs(folder, exist_ok=True)
    save_file(minidetr_to_hf(model.state_dict()), os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    for name, content in (("config.json", config), ("preprocessor_config.json", preprocessor)):
        with open(os.path.join(folder, name), "w") as f:
            json.dump(content, f, indent=2)
