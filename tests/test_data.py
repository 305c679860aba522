"""Data: VOC and shapes preparation, augmentation that keeps boxes on their pixels, batching."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from data import pipeline
from detr import DETR
from conftest import ROOT, load_script

VOC_XML = ("<annotation><filename>{id}.jpg</filename><size><width>{w}</width><height>{h}</height>"
           "<depth>3</depth></size>\n{objects}</annotation>")
VOC_OBJECT = """<object><name>{name}</name><difficult>{difficult}</difficult>
<bndbox><xmin>{box[0]}</xmin><ymin>{box[1]}</ymin><xmax>{box[2]}</xmax><ymax>{box[3]}</ymax></bndbox></object>"""


def write_voc(root, year, image_set, images):
    """images: {id: (w, h, [(name, difficult, (xmin, ymin, xmax, ymax)), ...]) or a raw XML string}."""
    folder = root / f"VOC{year}"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for image_id, spec in images.items():
        if isinstance(spec, str):
            (folder / "Annotations" / f"{image_id}.xml").write_text(spec)
            w, h = 20, 10
        else:
            w, h, objects = spec
            objs = "".join(VOC_OBJECT.format(name=n, difficult=d, box=b) for n, d, b in objects)
            (folder / "Annotations" / f"{image_id}.xml").write_text(VOC_XML.format(id=image_id, w=w, h=h, objects=objs))
        Image.new("RGB", (w, h), (90, 120, 150)).save(folder / "JPEGImages" / f"{image_id}.jpg")
    (folder / "ImageSets" / "Main" / f"{image_set}.txt").write_text("".join(f"{i}\n" for i in images))


def test_voc_prepare_exact_json_and_logged_skips(tmp_path):
    voc = load_script("data/voc/prepare.py")
    devkit = tmp_path / "VOCdevkit"
    write_voc(devkit, 2007, "test", {
        "000001": (40, 30, [("dog", 0, (1, 2, 40, 30)), ("person", 1, (5, 6, 10, 12))]),
        "000002": "<annotation><object><name>dog</name>",  # broken XML
        "000003": (20, 10, [("cat", 0, (7, 3, 7, 9)), ("car", 0, (2, 2, 5, 5))]),  # zero-width cat
    })
    lines = []
    counts = voc.prepare(str(devkit), ["2007"], [("val", "test")], str(tmp_path / "out"), log=lines.append)
    data = json.loads((tmp_path / "out" / "val.json").read_text())
    jpegs = devkit / "VOC2007" / "JPEGImages"
    assert data == {"classes": voc.CLASSES, "images": [
        {"file": str(jpegs / "000001.jpg"), "width": 40, "height": 30,
         "boxes": [[0.0, 1.0, 40.0, 30.0], [4.0, 5.0, 10.0, 12.0]], "labels": [11, 14], "difficult": [0, 1]},
        {"file": str(jpegs / "000003.jpg"), "width": 20, "height": 10,
         "boxes": [[1.0, 1.0, 5.0, 5.0]], "labels": [6], "difficult": [0]},
    ]}
    skips = [line for line in lines if line.startswith("skip")]
    assert len(skips) == 2
    assert "000002.xml" in skips[0] and "cannot parse" in skips[0]
    assert "000003.xml" in skips[1] and "empty box" in skips[1]
    assert counts == {"val": (2, 3, 1)}
    assert "skipped 1 images, 1 objects" in lines[-1]


def test_voc_prepare_other_bad_input(tmp_path):
    voc = load_script("data/voc/prepare.py")
    devkit = tmp_path / "VOCdevkit"
    write_voc(devkit, 2012, "trainval", {
        "a": (20, 10, [("unicorn", 0, (1, 1, 5, 5)), ("dog", 0, (1, 1, 21, 5)), ("dog", 0, (1, 1, 20, 10))]),
        "b": (20, 10, [("dog", 0, (1, 1, 5, 5))]),
    })
    (devkit / "VOC2012" / "JPEGImages" / "b.jpg").unlink()
    lines = []
    voc.prepare(str(devkit), ["2012"], [("train", "trainval")], str(tmp_path), log=lines.append)
    skips = [line for line in lines if line.startswith("skip")]
    assert "unknown class 'unicorn'" in skips[0] and "outside the 20x10 image" in skips[1]
    assert "b.jpg" in skips[2] and len(skips) == 3
    data = json.loads((tmp_path / "train.json").read_text())
    assert [r["boxes"] for r in data["images"]] == [[[0.0, 0.0, 20.0, 10.0]]]
    with pytest.raises(SystemExit, match="not a VOCdevkit folder"):
        voc.prepare(str(tmp_path / "nowhere"), ["2012"], [("train", "trainval")], str(tmp_path))


def test_voc_prepare_real_photos(tmp_path):
    voc = load_script("data/voc/prepare.py")
    counts = voc.prepare(str(ROOT / "tests/data/voc"), ["2012"], [("train", "trainval")], str(tmp_path), log=print)
    assert counts == {"train": (2, 7, 0)}
    first = json.loads((tmp_path / "train.json").read_text())["images"][0]
    assert (first["width"], first["height"]) == (500, 281)
    assert first["boxes"][0] == [103.0, 77.0, 375.0, 183.0] and first["labels"][:3] == [0, 0, 14]


def write_dataset(tmp_path, images, boxes, labels, difficult=None):
    records = []
    for i, (image, b, l) in enumerate(zip(images, boxes, labels)):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
        records.append({"file": f"{i}.png", "width": image.shape[1], "height": image.shape[0], "boxes": b,
                        "labels": l, "difficult": difficult[i] if difficult else [0] * len(l)})
    (tmp_path / "train.json").write_text(json.dumps({"classes": ["a", "b"], "images": records}))
    return tmp_path / "train.json"


def test_augmented_box_stays_on_its_pixels(tmp_path):
    image = np.zeros((120, 160, 3), np.uint8)
    image[30:70, 50:110] = (255, 0, 0)  # the object: a red rectangle
    path = write_dataset(tmp_path, [image], [[[50, 30, 110, 70]]], [[1]])
    transform = pipeline.make_transforms(True, scales=[96, 128, 144], max_size=200, crop_scales=[100, 120],
                                      crop_size=(60, 100), val_scale=128)
    dataset = pipeline.DetectionDataset(path, transform)
    mean, std = torch.tensor(pipeline.IMAGENET_MEAN)[:, None, None], torch.tensor(pipeline.IMAGENET_STD)[:, None, None]
    seen_boxes = set()
    for seed in range(30):
        torch.manual_seed(seed)
        x, target = dataset[0]
        red = ((x * std + mean)[0] > 0.5) & ((x * std + mean)[1] < 0.5)  # (h, w) where the image is red
        h, w = x.shape[1:]
        if len(target["boxes"]) == 0:  # the crop missed the object: no red may be left either
            assert red.sum() <= 2
            continue
        cx, cy, bw, bh = (target["boxes"][0] * torch.tensor([w, h, w, h])).tolist()
        x0, y0, x1, y1 = round(cx - bw / 2), round(cy - bh / 2), round(cx + bw / 2), round(cy + bh / 2)
        ys, xs = torch.nonzero(red, as_tuple=True)
        # the red pixels are exactly the box (1 pixel of interpolation at the edges)
        assert abs(xs.min() - x0) <= 1 and abs(xs.max() + 1 - x1) <= 1
        assert abs(ys.min() - y0) <= 1 and abs(ys.max() + 1 - y1) <= 1
        assert red[y0 + 1 : y1 - 1, x0 + 1 : x1 - 1].all()
        seen_boxes.add((h, w, x0, y0))
    assert len(seen_boxes) > 10  # flips, scales and crops really happened


def test_validation_transform_and_difficult(tmp_path):
    image = np.zeros((100, 200, 3), np.uint8)
    path = write_dataset(tmp_path, [image], [[[10, 20, 30, 60], [0, 0, 50, 50]]], [[0, 1]], difficult=[[0, 1]])
    transform = pipeline.make_transforms(False, scales=[96], max_size=1000, crop_scales=[96], crop_size=(50, 60),
                                      val_scale=50)
    x, target = pipeline.DetectionDataset(path, transform)[0]
    assert x.shape == (3, 50, 100)
    assert target["labels"].tolist() == [0]  # the difficult box is left out of training targets
    assert torch.allclose(target["boxes"], torch.tensor([[0.1, 0.4, 0.1, 0.4]]))
    assert target["orig_size"].tolist() == [100, 200]
    _, target = pipeline.DetectionDataset(path, transform, keep_difficult=True)[0]
    assert target["labels"].tolist() == [0, 1]


def test_corrupt_image_is_skipped_with_one_line(tmp_path, capsys):
    images = [np.full((40, 40, 3), v, np.uint8) for v in (10, 200)]
    path = write_dataset(tmp_path, images, [[[1, 1, 9, 9]], [[2, 2, 8, 8]]], [[0], [1]])
    (tmp_path / "0.png").write_bytes(b"\x89PNG truncated")
    transform = pipeline.make_transforms(False, [40], 1000, [40], (10, 20), 40)
    dataset = pipeline.DetectionDataset(path, transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=pipeline.collate)
    images, mask, targets = next(iter(loader))
    assert images.shape[0] == 2 and [t["image_id"] for t in targets] == [1, 1]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "0.png" in err[0] and err[0].startswith("skip")


def test_collate_mask_is_exactly_the_padding():
    a, b = torch.ones(3, 5, 7), torch.ones(3, 8, 4)
    images, mask, targets = pipeline.collate([(a, {"id": 0}), (b, {"id": 1})])
    assert images.shape == (2, 3, 8, 7) and targets == [{"id": 0}, {"id": 1}]
    expected = torch.ones(2, 8, 7, dtype=torch.bool)
    expected[0, :5, :7] = False
    expected[1, :8, :4] = False
    assert torch.equal(mask, expected)
    assert torch.equal(images[:, 0] == 1, ~expected)  # images sit top-left, zeros on the padding
    images, mask, _ = pipeline.collate([(a, {}), (b, {})], pad_to=32)
    assert images.shape == (2, 3, 32, 32) and mask[0, :5, :7].logical_not().all() and mask.sum() == 2 * 1024 - 35 - 32
    _, mask, _ = pipeline.collate([(a, {}), (a.clone(), {})])
    assert mask is None  # nothing padded: the model may take its fast path


def shapes_module(tmp_path, **overrides):
    shapes = load_script("data/shapes/prepare.py")
    shapes.out_dir = str(tmp_path)
    shapes.num_train, shapes.num_val, shapes.image_size = 12, 4, 96
    for k, v in overrides.items():
        setattr(shapes, k, v)
    return shapes


def test_shapes_prepare_is_deterministic(tmp_path):
    runs = []
    for workers in (1, 2):
        shapes = shapes_module(tmp_path / str(workers), workers=workers)
        shapes.main()
        runs.append([json.loads((tmp_path / str(workers) / f"{s}.json").read_text()) for s in ("train", "val")])
    assert runs[0] == runs[1]
    train_json = runs[0][0]
    assert train_json["classes"] == ["circle", "square", "triangle", "star"]
    assert all(1 <= len(r["labels"]) <= 6 for r in train_json["images"])
    for r in train_json["images"]:
        for x0, y0, x1, y1 in r["boxes"]:
            assert 0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 96


def test_shapes_boxes_enclose_the_drawn_shapes(tmp_path):
    # a flat grey background, one object per image: every pixel far from grey belongs to the shape
    shapes = shapes_module(tmp_path, min_objects=1, max_objects=1, num_train=24,
                           background=lambda rng, s: np.full((s, s, 3), 128, np.uint8))
    shapes.main()
    data = json.loads((tmp_path / "train.json").read_text())
    kinds = set()
    for r in data["images"]:
        pixels = np.asarray(Image.open(tmp_path / r["file"]).convert("RGB")).astype(int)
        ys, xs = np.nonzero(np.abs(pixels - 128).sum(-1) > 60)
        (x0, y0, x1, y1), = r["boxes"]
        assert abs(xs.min() - x0) <= 1.5 and abs(xs.max() + 1 - x1) <= 1.5, r
        assert abs(ys.min() - y0) <= 1.5 and abs(ys.max() + 1 - y1) <= 1.5, r
        kinds.add(r["labels"][0])
    assert kinds == {0, 1, 2, 3}


def test_a_phone_photo_is_read_as_displayed(tmp_path):
    """A JPEG stored landscape with EXIF orientation 6 (how phones store portrait shots) is shown upright by
    browsers and labelling tools, so a COCO export gives its displayed size and boxes. The prepare script
    keeps it, training sees the object inside its box, and sample.py draws it upright."""
    displayed = Image.new("RGB", (48, 80), (20, 20, 20))  # portrait, as a person sees it
    displayed.paste((230, 20, 20), (8, 40, 24, 64))  # the object: x 8..24, y 40..64
    stored = displayed.rotate(90, expand=True)  # the sensor's landscape pixels (80 x 48)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    stored.save(tmp_path / "phone.jpg", quality=95, exif=exif)
    assert Image.open(tmp_path / "phone.jpg").size == (80, 48)
    coco = {"images": [{"id": 1, "file_name": "phone.jpg", "width": 48, "height": 80}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [8, 40, 16, 24], "iscrowd": 0}],
            "categories": [{"id": 1, "name": "mug"}]}
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    lines = []
    load_script("data/coco/prepare.py").prepare(str(tmp_path / "ann.json"), str(tmp_path), str(tmp_path / "d"), "val",
                                                lines.append)
    record = json.loads((tmp_path / "d" / "val.json").read_text())["images"][0]
    assert (record["width"], record["height"]) == (48, 80) and not any(line.startswith("skip") for line in lines)
    pixels = pipeline.read_image(str(tmp_path / "phone.jpg"))
    assert pixels.shape == (3, 80, 48)
    image, target = pipeline.DetectionDataset(tmp_path / "d" / "val.json", pipeline.val_transform(48, 100))[0]
    cx, cy, w, h = (target["boxes"][0] * torch.tensor([48, 80, 48, 80])).tolist()
    inside = pixels[:, int(cy - h / 2) + 2:int(cy + h / 2) - 2, int(cx - w / 2) + 2:int(cx + w / 2) - 2].float()
    assert image.shape[1:] == (80, 48) and inside[0].mean() > 180 and inside[1].mean() < 60  # red: the object
    sample = load_script("sample.py")
    # nothing kept (threshold 2): the photo alone
    model = DETR(1, backbone="resnet18", hidden_dim=32, num_heads=4, num_encoder_layers=1, num_decoder_layers=1,
                 dim_feedforward=64, num_queries=4)
    model.classes = ["mug"]
    model.eval_config.update(val_scale=80, max_size=200)
    written = sample.sample(model, [str(tmp_path / "phone.jpg")], str(tmp_path / "drawn"), threshold=2.0)
    drawn = np.asarray(Image.open(written[0]))
    assert drawn.shape[0] > drawn.shape[1]  # upright: taller than wide


def test_images_without_exif_are_read_as_before(tmp_path):
    """The VOC and shapes images carry no orientation: the same pixels as PIL's own decoding."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (30, 50, 3), dtype=np.uint8)).save(tmp_path / "plain.png")
    ours = pipeline.read_image(str(tmp_path / "plain.png"))
    assert torch.equal(ours, torch.from_numpy(np.array(Image.open(tmp_path / "plain.png").convert("RGB")))
                       .permute(2, 0, 1))


def mosaic_dataset(tmp_path, max_objects=6, count=6):
    """count images of 120x160, each one coloured rectangle of its own (a class each), and a dataset that
    always makes mosaics of 64-pixel tiles."""
    images, boxes = [], []
    for i in range(count):
        image = np.zeros((120, 160, 3), np.uint8)
        x0, y0 = 20 + 10 * i, 20 + 5 * i
        image[y0 : y0 + 50, x0 : x0 + 60] = (255, 0, 0) if i % 2 == 0 else (0, 255, 0)
        images.append(image)
        boxes.append([[x0, y0, x0 + 60, y0 + 50]])
    path = write_dataset(tmp_path, images, boxes, [[i % 2] for i in range(count)])
    transform = pipeline.make_transforms(True, scales=[128], max_size=200, crop_scales=[128], crop_size=(120, 128),
                                         val_scale=128)
    return pipeline.DetectionDataset(path, transform, mosaic_prob=1.0, mosaic_tile=64, max_objects=max_objects)


def test_mosaic_puts_each_tiles_boxes_on_its_pixels(tmp_path):
    """DEIM's mosaic: several images on one canvas, each box still framing its own colour, no more objects
    than max_objects, and the same sample from the same seed."""
    dataset = mosaic_dataset(tmp_path)
    mean, std = torch.tensor(pipeline.IMAGENET_MEAN)[:, None, None], torch.tensor(pipeline.IMAGENET_STD)[:, None, None]
    counts = set()
    for seed in range(12):
        x, target = dataset[(seed % 6, seed, True)]
        pixels = x * std + mean
        h, w = x.shape[1:]
        counts.add(len(target["labels"]))
        for (cx, cy, bw, bh), label in zip((target["boxes"] * torch.tensor([w, h, w, h])).tolist(),
                                           target["labels"].tolist()):
            x0, y0, x1, y1 = round(cx - bw / 2), round(cy - bh / 2), round(cx + bw / 2), round(cy + bh / 2)
            inside = pixels[label, y0 + 1 : y1 - 1, x0 + 1 : x1 - 1]  # red for class 0, green for class 1
            assert inside.numel() > 0 and (inside > 0.5).float().mean() > 0.95
        again, again_target = dataset[(seed % 6, seed, True)]
        assert torch.equal(x, again) and torch.equal(target["boxes"], again_target["boxes"])
    assert max(counts) > 1  # tiles of other images came in with their objects
    small = mosaic_dataset(tmp_path, max_objects=2)
    assert all(len(small[(i, i, True)][1]["labels"]) <= 2 for i in range(6))
    plain = dataset[(0, 0, False)][1]  # not allowed: the image alone
    assert len(plain["labels"]) == 1


def test_mosaic_stops_after_its_fraction_and_the_order_resumes_exactly():
    """ResumableSampler marks mosaics allowed only for a process's first mosaic_until samples; entered at
    any point it continues the same stream of (index, seed, allowed)."""
    sampler = pipeline.ResumableSampler(10, seed=3, mosaic_until=25)
    stream = [next(s) for s in [iter(sampler)] for _ in range(40)]
    assert [allowed for _, _, allowed in stream] == [True] * 25 + [False] * 15
    resumed = iter(pipeline.ResumableSampler(10, seed=3, start=17, mosaic_until=25))
    assert [next(resumed) for _ in range(23)] == stream[17:]
    ranks = [iter(pipeline.ResumableSampler(10, seed=3, start=4, rank=r, world_size=2, mosaic_until=6)) for r in (0, 1)]
    assert [next(ranks[0])[2] for _ in range(4)] == [True, True, False, False]
