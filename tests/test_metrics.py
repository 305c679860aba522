"""compute_map against hand-computed APs, the VOC devkit's loop and pycocotools' COCOeval."""

import math

import numpy as np
import pytest
import torch

from lib.metrics import compute_map


def det(boxes, scores, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "scores": torch.tensor(scores),
            "labels": torch.tensor(labels)}


def gt(boxes, labels, difficult=None):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(labels),
            "difficult": torch.tensor(difficult or [0] * len(labels), dtype=torch.bool)}


def test_hand_computed_ap_where_11_point_differs():
    # two objects; detections by score: hit, miss, hit -> precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1
    gts = [gt([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 0])]
    dets = [det([[0, 0, 10, 10], [50, 50, 60, 60], [20, 20, 30, 30]], [0.9, 0.8, 0.7], [0, 0, 0])]
    m = compute_map(dets, gts, num_classes=1)
    assert m["mAP50"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)  # 0.8333
    assert m["mAP50_07"] == pytest.approx((6 * 1 + 5 * 2 / 3) / 11)  # 0.8485: recall >= 0.6 only reaches 2/3
    assert m["mAP"] == pytest.approx((51 * 1 + 50 * 2 / 3) / 101)  # perfect boxes: every IoU threshold alike
    assert m["AP50_per_class"] == [pytest.approx(0.8333333)]


def test_iou_thresholds_and_duplicates():
    # one object; the first detection has IoU 0.6 (a hit below 0.65 only), the second is exact but a
    # duplicate at IoU 0.5 (already taken) and the only hit above 0.6
    gts = [gt([[0, 0, 10, 10]], [0])]
    dets = [det([[0, 0, 10, 6], [0, 0, 10, 10]], [0.9, 0.8], [0, 0])]
    m = compute_map(dets, gts, num_classes=1)
    assert m["mAP50"] == 1.0
    # thresholds 0.5, 0.55, 0.6: first detection hits, AP 1; 0.65 ... 0.95: second hits, precision 1/2
    assert m["mAP"] == pytest.approx((3 * 1.0 + 7 * 0.5) / 10)
    assert m["mAP75"] == pytest.approx(0.5)


def test_difficult_objects_are_neither_true_nor_false_positives():
    gts = [gt([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 0], difficult=[1, 0])]
    dets = [det([[0, 0, 10, 10], [20, 20, 30, 30]], [0.9, 0.8], [0, 0])]
    m = compute_map(dets, gts, num_classes=1)
    assert m["mAP50"] == 1.0 and m["mAP50_07"] == 1.0 and m["mAP"] == 1.0  # a false positive would give 0.5
    # missing the difficult object costs nothing either
    m = compute_map([det([[20, 20, 30, 30]], [0.8], [0])], gts, num_classes=1)
    assert m["mAP50"] == 1.0


def test_classes_without_ground_truth_are_left_out():
    gts = [gt([[0, 0, 10, 10]], [1]), gt([], [])]
    dets = [det([[0, 0, 10, 10], [0, 0, 5, 5]], [0.9, 0.95], [1, 2]), det([], [], [])]
    m = compute_map(dets, gts, num_classes=3)
    assert m["mAP50"] == 1.0 and math.isnan(m["AP50_per_class"][0]) and math.isnan(m["AP50_per_class"][2])
    assert compute_map([det([], [], [])], [gt([[0, 0, 1, 1]], [0])], num_classes=1)["mAP"] == 0.0


def random_case(rng, num_images, num_classes, difficult_rate):
    dets, gts = [], []
    for _ in range(num_images):
        n = rng.integers(0, 6)
        xy = rng.uniform(0, 80, (n, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(5, 40, (n, 2))], 1)
        labels = rng.integers(0, num_classes, n)
        gts.append(gt(boxes.tolist(), labels.tolist(), (rng.random(n) < difficult_rate).astype(int).tolist()))
        m = rng.integers(0, 12)
        source = rng.integers(0, max(n, 1), m)  # most detections jitter a real box, some are random
        jitter = boxes[source] + rng.normal(0, 2.5, (m, 4)) if n else rng.uniform(0, 100, (m, 4))
        noise = rng.random(m) < 0.3
        jitter[noise] = rng.uniform(0, 80, (noise.sum(), 4))
        jitter[:, 2:] = np.maximum(jitter[:, 2:], jitter[:, :2] + 1)
        det_labels = np.where(rng.random(m) < 0.8, labels[source] if n else 0, rng.integers(0, num_classes, m))
        scores = rng.random(m) * np.where(noise, 0.6, 1.0)  # random boxes tend to score lower
        dets.append(det(jitter.tolist(), scores.tolist(), det_labels.tolist()))
    return dets, gts


def devkit_voc_ap(dets, gts, num_classes, use_07):
    """The VOC devkit's voc_eval, written as a plain loop over classes and sorted detections."""
    aps = []
    for c in range(num_classes):
        objects = {i: (g["boxes"][g["labels"] == c].numpy(), g["difficult"][g["labels"] == c].numpy())
                   for i, g in enumerate(gts)}
        npos = sum(int((~d).sum()) for _, d in objects.values())
        if npos == 0:
            continue
        taken = {i: np.zeros(len(b), bool) for i, (b, _) in objects.items()}
        items = [(float(s), i, b.numpy()) for i, d in enumerate(dets)
                 for s, b, l in zip(d["scores"], d["boxes"], d["labels"]) if l == c]
        items.sort(key=lambda t: -t[0])
        tp, fp = np.zeros(len(items)), np.zeros(len(items))
        for k, (_, i, b) in enumerate(items):
            boxes, difficult = objects[i]
            ovmax = -np.inf
            if len(boxes):
                iw = np.maximum(np.minimum(boxes[:, 2], b[2]) - np.maximum(boxes[:, 0], b[0]), 0)
                ih = np.maximum(np.minimum(boxes[:, 3], b[3]) - np.maximum(boxes[:, 1], b[1]), 0)
                inter = iw * ih
                union = ((b[2] - b[0]) * (b[3] - b[1]) + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
                         - inter)
                overlaps = inter / union
                ovmax, jmax = overlaps.max(), overlaps.argmax()
            if ovmax > 0.5:
                if not difficult[jmax]:
                    if not taken[i][jmax]:
                        tp[k], taken[i][jmax] = 1, True
                    else:
                        fp[k] = 1
            else:
                fp[k] = 1
        fp, tp = np.cumsum(fp), np.cumsum(tp)
        rec, prec = tp / npos, tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        if use_07:
            ap = sum((prec[rec >= t].max() if (rec >= t).any() else 0) / 11 for t in np.arange(0.0, 1.1, 0.1))
        else:
            mrec, mpre = np.r_[0, rec, 1], np.r_[0, prec, 0]
            for j in range(len(mpre) - 1, 0, -1):
                mpre[j - 1] = max(mpre[j - 1], mpre[j])
            j = np.where(mrec[1:] != mrec[:-1])[0]
            ap = np.sum((mrec[j + 1] - mrec[j]) * mpre[j + 1])
        aps.append(ap)
    return np.mean(aps)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_voc_metrics_equal_the_devkit_loop(seed):
    dets, gts = random_case(np.random.default_rng(seed), num_images=60, num_classes=4, difficult_rate=0.2)
    m = compute_map(dets, gts, num_classes=4)
    assert m["mAP50"] == pytest.approx(devkit_voc_ap(dets, gts, 4, use_07=False), abs=1e-9)
    assert m["mAP50_07"] == pytest.approx(devkit_voc_ap(dets, gts, 4, use_07=True), abs=1e-9)
    assert 0.05 < m["mAP50"] < 0.9  # a case with real hits and real misses


@pytest.mark.parametrize("seed", [0, 1])
def test_coco_map_equals_pycocotools(seed):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    dets, gts = random_case(np.random.default_rng(seed), num_images=80, num_classes=5, difficult_rate=0.0)
    assert sum(len(d["scores"]) for d in dets) > 300
    images, annotations, results = [], [], []
    for i, (d, g) in enumerate(zip(dets, gts)):
        images.append({"id": i, "width": 128, "height": 128})
        for b, l in zip(g["boxes"].tolist(), g["labels"].tolist()):
            w, h = b[2] - b[0], b[3] - b[1]
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": l, "bbox": [b[0], b[1], w, h],
                                "area": w * h, "iscrowd": 0})
        for b, s, l in zip(d["boxes"].tolist(), d["scores"].tolist(), d["labels"].tolist()):
            results.append({"image_id": i, "category_id": l, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                            "score": s})
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations, "categories": [{"id": c} for c in range(5)]}
    coco.createIndex()
    evaluator = COCOeval(coco, coco.loadRes(results), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    m = compute_map(dets, gts, num_classes=5)
    assert m["mAP"] == pytest.approx(evaluator.stats[0], abs=1e-6)  # the issue asks 1e-3; it is exact
    assert m["mAP75"] == pytest.approx(evaluator.stats[2], abs=1e-6)
    assert 0.05 < m["mAP"] < 0.9


def coco_export(rng, num_images=60, category_ids=(2, 5, 11, 40)):
    """A hand-made COCO ground truth and results: non-contiguous image and category ids, empty images,
    crowds, objects of every COCO area range (with segment areas unlike their boxes), detections that
    overlap a crowd and a real object at once, and one image with more than 100 detections of a class."""
    images, annotations, results = [], [], []
    for i in range(num_images):
        image_id = 1000 + 7 * i
        images.append({"id": image_id, "width": 320, "height": 320, "file_name": f"{image_id}.png"})
        n = 0 if i % 10 == 3 else int(rng.integers(1, 6))  # every tenth image has no object
        for _ in range(n):
            size = rng.choice([rng.uniform(8, 30), rng.uniform(35, 90), rng.uniform(100, 200)], 2)
            x, y = rng.uniform(0, 320 - size[0]), rng.uniform(0, 320 - size[1])
            crowd = int(rng.random() < 0.15)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": int(rng.choice(category_ids)), "bbox": [x, y, *size.tolist()],
                                "area": float(size.prod() * rng.uniform(0.6, 1.0)), "iscrowd": crowd})
        mine = [a for a in annotations if a["image_id"] == image_id]
        for a in mine:  # jittered copies, some with the wrong class
            for _ in range(int(rng.integers(1, 4))):
                box = (np.array(a["bbox"]) + rng.normal(0, 0.08 * max(a["bbox"][2:]), 4)).clip(0.5)
                category = a["category_id"] if rng.random() < 0.8 else int(rng.choice(category_ids))
                results.append({"image_id": image_id, "category_id": category, "bbox": box.tolist(),
                                "score": float(rng.random())})
        if any(a["iscrowd"] for a in mine):  # a box inside a crowd and over a real object beside it
            crowd = next(a for a in mine if a["iscrowd"])
            x, y, w, h = crowd["bbox"]
            results.append({"image_id": image_id, "category_id": crowd["category_id"],
                            "bbox": [x + w / 2, y + h / 2, w, h], "score": 0.95})
        for _ in range(int(rng.integers(0, 4))):  # random boxes
            xy = rng.uniform(0, 250, 2)
            results.append({"image_id": image_id, "category_id": int(rng.choice(category_ids)),
                            "bbox": [*xy.tolist(), *rng.uniform(5, 70, 2).tolist()],
                            "score": float(rng.random() * 0.6)})
    crowded = images[1]["id"]  # 130 detections of one class in one image: only the best 100 count
    for _ in range(130):
        xy = rng.uniform(0, 300, 2)
        results.append({"image_id": crowded, "category_id": category_ids[0],
                        "bbox": [*xy.tolist(), 15.0, 15.0], "score": float(rng.random())})
    categories = [{"id": c, "name": f"class{c}"} for c in category_ids]
    return {"images": images, "annotations": annotations, "categories": categories}, results


@pytest.mark.parametrize("seed, max_dets", [(0, 100), (1, 100), (2, 100), (0, 10)])
def test_coco_crowds_areas_and_ids_equal_pycocotools(seed, max_dets):
    """mAP, mAP75, the area ranges, AR at max_dets and each class's AP equal pycocotools' (maxDets = max_dets)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    ground_truth, results = coco_export(np.random.default_rng(seed))
    coco = COCO()
    coco.dataset = ground_truth
    coco.createIndex()
    evaluator = COCOeval(coco, coco.loadRes(results), "bbox")
    evaluator.params.maxDets = [1, 10, max_dets]  # summarize's AP and AR use the last
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()

    label = {c["id"]: k for k, c in enumerate(ground_truth["categories"])}
    dets, gts = [], []
    for image in sorted(ground_truth["images"], key=lambda im: im["id"]):
        anns = [a for a in ground_truth["annotations"] if a["image_id"] == image["id"]]
        res = [r for r in results if r["image_id"] == image["id"]]
        xyxy = lambda b: [b[0], b[1], b[0] + b[2], b[1] + b[3]]  # noqa: E731
        gts.append({"boxes": torch.tensor([xyxy(a["bbox"]) for a in anns], dtype=torch.float64).reshape(-1, 4),
                    "labels": torch.tensor([label[a["category_id"]] for a in anns], dtype=torch.int64),
                    "iscrowd": torch.tensor([a["iscrowd"] for a in anns], dtype=torch.bool),
                    "area": torch.tensor([a["area"] for a in anns], dtype=torch.float64)})
        dets.append({"boxes": torch.tensor([xyxy(r["bbox"]) for r in res], dtype=torch.float64).reshape(-1, 4),
                     "scores": torch.tensor([r["score"] for r in res], dtype=torch.float64),
                     "labels": torch.tensor([label[r["category_id"]] for r in res], dtype=torch.int64)})
    m = compute_map(dets, gts, num_classes=len(label), max_dets=max_dets)
    precision = evaluator.eval["precision"][:, :, :, 0, -1]  # (IoUs, recalls, classes) at every area, max_dets
    ours = [m["mAP"], m["mAP75"], m["mAP_small"], m["mAP_medium"], m["mAP_large"], m[f"AR{max_dets}"]]
    # stats[0] is at 100 always
    theirs = [precision[precision > -1].mean(), *(evaluator.stats[i] for i in (2, 3, 4, 5, 8))]
    assert ours == pytest.approx(theirs, abs=1e-6)
    per_class = [precision[:, :, k][precision[:, :, k] > -1].mean() for k in range(len(label))]
    assert m["AP_per_class"] == pytest.approx(per_class, abs=1e-6)
    assert sum(a["iscrowd"] for a in ground_truth["annotations"]) >= 3 and 0.05 < m["mAP"] < 0.9
    # tools/eval.py's per-class columns (details): AP50, AP75 and AR at max_dets as pycocotools has them per class
    d = compute_map(dets, gts, num_classes=len(label), max_dets=max_dets, details=True)
    recall = evaluator.eval["recall"][:, :, 0, -1]  # (IoUs, classes)
    for k in range(len(label)):
        for key, t in (("AP50", 0), ("AP75", 5)):
            assert d["per_class"][key][k] == pytest.approx(precision[t, :, k][precision[t, :, k] > -1].mean(), abs=1e-6)
        assert d["per_class"][f"AR{max_dets}"][k] == pytest.approx(recall[:, k].mean(), abs=1e-6)
        category = ground_truth["categories"][k]["id"]
        assert d["per_class"]["objects"][k] == sum(a["category_id"] == category and not a["iscrowd"]
                                                   for a in ground_truth["annotations"])
    assert d["per_class"]["AP"] == m["AP_per_class"] and d["mAP"] == m["mAP"]
