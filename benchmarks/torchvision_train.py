"""Trains torchvision's RetinaNet from scratch on a COCO-layout dataset with
one of our presets' recipes, then scores the val split with pycocotools: the
peer of `retinanet train` for the same data, schedule and image size.

    pip install torch torchvision pycocotools pillow
    retinanet synth --out /tmp/shapes128 --size 128          # or any COCO folder
    python3 benchmarks/torchvision_train.py --data /tmp/shapes128 --preset shapes
    python3 benchmarks/torchvision_train.py --data assets/bccd --preset bccd

The `shapes` recipe mirrors configs/shapes.toml: the tiny ResNet-18-style
body (16-128 channels, BatchNorm), FPN 64, two-conv GroupNorm heads,
anchors 8-128 with ratio 1, IoU 0.4/0.3, GIoU box loss, batch 8, SGD lr 0.02
momentum 0.9, weight decay 1e-4, 100 warmup steps then cosine, horizontal
flips, 14 epochs,
and PyTorch's default conv init in the body (`model.backbone.init`).
The preset then went two steps further: detectron2's EMA of the foreground
count as loss normaliser (`loss.normalizer = "ema"`, which torchvision
lacks; this script keeps its per-image one) and 5 epochs of 5,600 images
instead of 14 of 2,000. Later it took ATSS matching and a box-loss weight
of 2, which this script has as options (`--set 'matcher="atss"' --set
box_weight=2`).
The `bccd` recipe mirrors configs/bccd.toml likewise. Per-class AP is
printed after the summary.

The augmentations and the weight average of `input.augment` and
`train.ema_decay` are recipe keys too, off unless set (the same ranges as
our config's defaults; `--set photometric=0.5 --set ema_decay=0.99`):
- `photometric`: probability of `v2.ColorJitter(brightness, contrast,
  saturation, hue)` with the `jitter_*` ranges;
- `zoom_out`: `v2.RandomZoomOut(fill=mean, side_range=(1, zoom_max), p)`;
- `iou_crop`: probability of `v2.RandomIoUCrop()` with its defaults, then
  `v2.SanitizeBoundingBoxes`;
- `scale_jitter`: probability of `v2.ScaleJitter((S, S), scale_range)`
  (no antialiasing, as the model's own resize) and a random window of at
  most S x S, S = `jitter_size` or `max_size`; such images skip the model's
  resize, as ours skip the `min_size` one;
- `min_visible`: a box a crop cuts stays when this share of it is left;
- `ema_decay`, `ema_warmup`: `torch.optim.swa_utils.AveragedModel` with
  Ultralytics' ramped decay over weights and BatchNorm buffers, evaluated
  instead of the model.

`min_size` mirrors `input.min_size` as a list (`--set
'min_size=[320,352,384,416,448]' --set max_size=597`): each training image's
shorter side is drawn from it, and the last size is the one evaluated.

Two loss keys mirror `loss.box_weight` and `loss.matcher`:
- `box_weight`: the box-regression loss is multiplied by it (default 1);
- `matcher`: "max_iou" (torchvision's `Matcher`) or "atss", mmdetection's
  `ATSSAssigner(topk=atss_topk)` (see `atss_match`), which torchvision
  lacks.
"""
import argparse
import json
import math
import os
import time

import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch.optim.swa_utils import AveragedModel
from torchvision import tv_tensors
from torchvision.ops import boxes as box_ops
from torchvision.transforms import v2
from torchvision.transforms.functional import pil_to_tensor

from torchvision_bench import OCTAVE_SCALES, build

# Augmentations and the weight average: off unless a --set turns them on.
AUGMENT = dict(photometric=0.0, brightness=0.125, contrast=0.5, saturation=0.5, hue=0.05,
               zoom_out=0.0, zoom_max=4.0, iou_crop=0.0, scale_jitter=0.0, jitter_range=[0.1, 2.0],
               jitter_size=0, min_visible=0.0, ema_decay=0.0, ema_warmup=2000)
# Loss and optimiser keys (ours: loss.box_weight, loss.matcher,
# loss.atss_topk, train.clip_grad_norm; 0 leaves the gradients unclipped).
LOSS = dict(box_weight=1.0, matcher="max_iou", atss_topk=9, clip_grad_norm=0.0)
# Multi-scale training (ours: a list in input.min_size): the shorter side is
# drawn from the list per image and the last one is evaluated, as
# torchvision's GeneralizedRCNNTransform does; empty keeps `size` alone.
INPUT = dict(min_size=[])

RECIPES = {
    "shapes": dict(depth=18, width=16, fpn=64, head_convs=2, head_gn=True, size=128,
                   sizes=[8, 16, 32, 64, 128], ratios=[1.0], scales=OCTAVE_SCALES, fg_iou=0.4, bg_iou=0.3,
                   batch=8, lr=0.02, epochs=14, warmup=100, init="torch_default", box_loss="giou"),
    # configs/bccd.toml: ResNet-18 body, FPN 128, four-conv GroupNorm heads,
    # torchvision's anchors, 480x640 scaled to a shorter side of 320-448
    # (evaluated at 448x597), 20 epochs. Its recipe until 2026-12-03, 13
    # epochs at 384x512: `--set 'min_size=[]' --set size=384 --set
    # max_size=512 --epochs 13`.
    "bccd": dict(depth=18, width=64, fpn=128, head_convs=4, head_gn=True, size=448, max_size=597,
                 min_size=[320, 352, 384, 416, 448],
                 sizes=[32, 64, 128, 256, 512], ratios=[0.5, 1.0, 2.0], scales=OCTAVE_SCALES, fg_iou=0.5, bg_iou=0.4,
                 batch=4, lr=0.01, epochs=20, warmup=100, init="torch_default", box_loss="giou",
                 clip_grad_norm=10.0),
}


def load_split(root, split, cat_index):
    coco = json.load(open(os.path.join(root, "annotations", f"instances_{split}.json")))
    by_image = {im["id"]: [] for im in coco["images"]}
    for a in coco["annotations"]:
        if not a.get("iscrowd", 0):
            by_image[a["image_id"]].append(a)
    items = []
    for im in coco["images"]:
        anns = by_image[im["id"]]
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in anns], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([cat_index[a["category_id"]] for a in anns], dtype=torch.int64)
        items.append((im["id"], os.path.join(root, "images", im["file_name"]), boxes, labels))
    return items


def image_tensor(path):
    return pil_to_tensor(Image.open(path).convert("RGB")).float() / 255.0


MEAN = [0.485, 0.456, 0.406]


def pixel_augmentations(r):
    """The v2 pipeline before the resize: photometric, zoom-out, IoU crop, flip."""
    steps = []
    if r["photometric"] > 0:
        jitter = v2.ColorJitter(r["brightness"], r["contrast"], r["saturation"], r["hue"])
        steps.append(v2.RandomApply([jitter], p=r["photometric"]))
    if r["zoom_out"] > 0:
        steps.append(v2.RandomZoomOut(fill={tv_tensors.Image: MEAN, "others": 0},
                                      side_range=(1.0, r["zoom_max"]), p=r["zoom_out"]))
    if r["iou_crop"] > 0:
        steps.append(v2.RandomApply([v2.RandomIoUCrop()], p=r["iou_crop"]))
    steps.append(v2.RandomHorizontalFlip(0.5))
    steps.append(v2.SanitizeBoundingBoxes(min_size=1.0))
    return v2.Compose(steps)


def keep_visible(boxes, labels, before_area, min_visible):
    """Drops boxes a crop left less than `min_visible` of (areas before the crop given)."""
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    keep = (w >= 1) & (h >= 1) & (w * h >= min_visible * before_area)
    return boxes[keep], labels[keep]


def scale_jitter(img, boxes, labels, r, gen):
    """ScaleJitter to a square of jitter_size, then a random window of at most that square."""
    size = r["jitter_size"] or r.get("max_size", r["size"])
    lo, hi = r["jitter_range"]
    jitter = v2.ScaleJitter((size, size), scale_range=(lo, hi), antialias=False)
    img, bb = jitter(tv_tensors.Image(img), tv_tensors.BoundingBoxes(boxes, format="XYXY",
                                                                    canvas_size=img.shape[-2:]))
    h, w = img.shape[-2:]
    ch, cw = min(h, size), min(w, size)
    top = round((h - ch) * torch.rand(1, generator=gen).item())
    left = round((w - cw) * torch.rand(1, generator=gen).item())
    area = (bb[:, 2] - bb[:, 0]) * (bb[:, 3] - bb[:, 1])
    img = img[:, top:top + ch, left:left + cw]
    boxes = bb.as_subclass(torch.Tensor) - torch.tensor([left, top, left, top], dtype=torch.float32)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, cw)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, ch)
    boxes, labels = keep_visible(boxes, labels, area, r["min_visible"])
    return img.as_subclass(torch.Tensor), boxes, labels


def atss_match(gt_boxes, anchors, level_sizes, topk):
    """mmdetection's ATSSAssigner: per box, the `topk` anchors per level with
    the nearest centres are candidates; foreground where IoU >= their mean +
    std and the anchor centre lies inside the box; the higher IoU wins an
    anchor claimed twice. Returns torchvision's matched_idxs (-1 background)."""
    iou = box_ops.box_iou(anchors, gt_boxes)  # [A, G]
    anchor_centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    gt_centres = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
    distances = torch.cdist(anchor_centres, gt_centres)  # [A, G]
    candidates, start = [], 0
    for size in level_sizes:
        k = min(topk, size)
        candidates.append(distances[start:start + size].topk(k, dim=0, largest=False).indices + start)
        start += size
    candidates = torch.cat(candidates)  # [C, G]
    cols = torch.arange(gt_boxes.shape[0])
    cand_iou = iou[candidates, cols]
    threshold = cand_iou.mean(0) + cand_iou.std(0)
    cx, cy = anchor_centres[candidates, 0], anchor_centres[candidates, 1]
    inside = torch.stack([cx - gt_boxes[:, 0], cy - gt_boxes[:, 1], gt_boxes[:, 2] - cx,
                          gt_boxes[:, 3] - cy]).amin(0) > 0.01
    positive = (cand_iou >= threshold) & inside
    claimed = torch.full_like(iou, -1.0)
    rows, gts = candidates[positive], cols.expand_as(candidates)[positive]
    claimed[rows, gts] = iou[rows, gts]
    best, best_gt = claimed.max(1)
    return torch.where(best >= 0, best_gt, torch.full_like(best_gt, -1))


def use_atss(model, topk):
    """Replaces the model's matching by `atss_match`; the anchor generator
    records each level's anchor count, which the matcher needs."""
    level_sizes = []
    generate = model.anchor_generator.forward

    def recording(image_list, features):
        per_location = model.anchor_generator.num_anchors_per_location()[0]
        level_sizes[:] = [f.shape[-2] * f.shape[-1] * per_location for f in features]
        return generate(image_list, features)

    def compute_loss(targets, head_outputs, anchors):
        matched = []
        for anchors_per_image, t in zip(anchors, targets):
            if t["boxes"].numel() == 0:
                matched.append(torch.full((anchors_per_image.size(0),), -1, dtype=torch.int64))
            else:
                matched.append(atss_match(t["boxes"], anchors_per_image, level_sizes, topk))
        return model.head.compute_loss(targets, head_outputs, anchors, matched)

    model.anchor_generator.forward = recording
    model.compute_loss = compute_loss


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--preset", choices=RECIPES, default="shapes")
    p.add_argument("--epochs", type=int)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe entry, e.g. --set lr=0.04 (value parsed as JSON)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args()
    r = {**AUGMENT, **LOSS, **INPUT, **RECIPES[args.preset]}  # a recipe's own entries win
    if args.epochs:
        r["epochs"] = args.epochs
    for item in args.set:
        key, value = item.split("=", 1)
        if key not in r:
            p.error(f"unknown recipe key {key}; known: {', '.join(r)}")
        r[key] = json.loads(value)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    gt = COCO(os.path.join(args.data, "annotations", "instances_val.json"))
    cat_ids = sorted(gt.getCatIds())
    cat_index = {c: i for i, c in enumerate(cat_ids)}
    train = load_split(args.data, "train", cat_index)
    val = load_split(args.data, "val", cat_index)
    model_args = argparse.Namespace(depth=r["depth"], width=r["width"], fpn=r["fpn"], head_convs=r["head_convs"],
                                    head_gn=r["head_gn"], classes=len(cat_ids), sizes=r["sizes"], ratios=r["ratios"],
                                    scales=r["scales"],
                                    size=r["size"], image_width=None, min_size=tuple(r["min_size"]) or r["size"],
                                    max_size=r.get("max_size", r["size"]),
                                    recipe="scratch", init=r["init"])
    model = build(model_args)
    # Scale-jittered images are already at their size: skip the model's resize for them.
    model_resize = model.transform.resize

    def resize(image, target=None):
        if target is not None and target.get("jittered", False):
            return image, target
        return model_resize(image, target)

    model.transform.resize = resize
    augment = pixel_augmentations(r)
    model.proposal_matcher.high_threshold = r["fg_iou"]
    model.proposal_matcher.low_threshold = r["bg_iou"]
    model.head.regression_head._loss_type = r["box_loss"]  # "l1" or "giou"
    if r["matcher"] == "atss":
        use_atss(model, r["atss_topk"])
    elif r["matcher"] != "max_iou":
        p.error(f"unknown matcher {r['matcher']}; known: max_iou, atss")
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.SGD(params, lr=r["lr"], momentum=0.9, weight_decay=1e-4)
    ema = None
    if r["ema_decay"] > 0:
        def ramped(avg, cur, n):  # Ultralytics' ModelEMA: n updates so far
            d = r["ema_decay"] * (1 - math.exp(-(int(n) + 1) / r["ema_warmup"]))
            return d * avg + (1 - d) * cur
        ema = AveragedModel(model, avg_fn=ramped, use_buffers=True)
    steps_per_epoch = len(train) // r["batch"]
    total = steps_per_epoch * r["epochs"]

    def lr_at(step):
        warm = 0.001 * (1 - step / r["warmup"]) + step / r["warmup"] if step < r["warmup"] else 1.0
        return r["lr"] * 0.5 * (1 + math.cos(math.pi * step / total)) * warm

    gen = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    step = 0
    model.train()
    for epoch in range(r["epochs"]):
        order = torch.randperm(len(train), generator=gen).tolist()
        for b in range(steps_per_epoch):
            images, targets = [], []
            for i in order[b * r["batch"]:(b + 1) * r["batch"]]:
                _, path, boxes, labels = train[i]
                img = image_tensor(path)
                sample = augment(tv_tensors.Image(img),
                                 {"boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=img.shape[-2:]),
                                  "labels": labels})
                img, target = sample
                img = img.as_subclass(torch.Tensor)
                boxes, labels = target["boxes"].as_subclass(torch.Tensor), target["labels"]
                jittered = r["scale_jitter"] > 0 and torch.rand(1, generator=gen).item() < r["scale_jitter"]
                if jittered:
                    img, boxes, labels = scale_jitter(img, boxes, labels, r, gen)
                images.append(img)
                targets.append({"boxes": boxes, "labels": labels, "jittered": jittered})
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            losses = model(images, targets)
            loss = losses["classification"] + r["box_weight"] * losses["bbox_regression"]
            opt.zero_grad()
            loss.backward()
            if r["clip_grad_norm"] > 0:
                torch.nn.utils.clip_grad_norm_(params, r["clip_grad_norm"])
            opt.step()
            if ema is not None:
                ema.update_parameters(model)
            step += 1
            if step % 50 == 0:
                rate = step * r["batch"] / (time.perf_counter() - started)
                print(f"step {step}/{total} epoch {epoch} loss {loss.item():.4f} {rate:.1f} img/s", flush=True)
    train_seconds = time.perf_counter() - started
    evaluated = model if ema is None else ema.module
    evaluated.eval()
    results = []
    with torch.no_grad():
        for image_id, path, _, _ in val:
            out = evaluated([image_tensor(path)])[0]
            for box, score, label in zip(out["boxes"].tolist(), out["scores"].tolist(), out["labels"].tolist()):
                results.append({"image_id": image_id, "category_id": cat_ids[label],
                                "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "score": score})
    if not results:  # pycocotools' loadRes cannot take an empty list
        print(json.dumps({"preset": args.preset, "recipe": r, "train_seconds": train_seconds, "ap": 0.0,
                          "detections": 0}))
        return
    ev = COCOeval(gt, gt.loadRes(results), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    per_class = {}
    for k, cat in enumerate(cat_ids):  # precision [iou, recall, class, area, maxdets]
        p = ev.eval["precision"][:, :, k, 0, -1]
        per_class[gt.cats[cat]["name"]] = float(p[p > -1].mean()) if (p > -1).any() else float("nan")
    print("per-class AP:", json.dumps(per_class))
    print(json.dumps({"preset": args.preset, "recipe": r, "epochs": r["epochs"], "images_seen": step * r["batch"],
                      "train_seconds": train_seconds, "ap": ev.stats[0], "ap50": ev.stats[1], "per_class_ap": per_class,
                      "torch": torch.__version__, "threads": args.threads}))


if __name__ == "__main__":
    main()
