"""Writes a COCO-val-sized evaluation case: gt.json and dt.json.

    python3 benchmarks/coco_eval/make_case.py OUT_DIR [--images 5000] [--seed 0]

5,000 images, 80 categories with COCO's non-contiguous ids, about 35,000
ground-truth boxes (COCO-like size mix, 1% crowd, `area` below w*h like a
segment's), and exactly 100 detections per image: noisy copies of most
ground-truth boxes plus random false positives, scores with ties. The same
seed gives the same files. Nothing is written into the repository unless
OUT_DIR points there.
"""

import argparse
import json
import os

import numpy as np

# COCO's 80 category ids: 1..90 without the 10 unused ones.
CATEGORY_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]


def boxes(rng, n, width, height):
    """`[n, 4]` xywh boxes with log-uniform sides from 4 px to the image size."""
    w = np.exp(rng.uniform(np.log(4), np.log(width), n))
    h = np.clip(w * np.exp(rng.normal(0, 0.5, n)), 4, height)
    x = rng.uniform(0, 1, n) * (width - w)
    y = rng.uniform(0, 1, n) * (height - h)
    return np.round(np.stack([x, y, w, h], 1), 2)


def make(rng, n_images):
    images, annotations, detections = [], [], []
    for image_id in range(1, n_images + 1):
        width, height = int(rng.choice([640, 480, 500])), int(rng.choice([480, 427, 375]))
        images.append({"id": image_id, "file_name": f"{image_id:012d}.jpg", "width": width, "height": height})
        n_gt = rng.poisson(7)
        gt = boxes(rng, n_gt, width, height)
        cats = rng.choice(CATEGORY_IDS, n_gt)
        for b, c in zip(gt, cats):
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": int(c),
                "bbox": [float(v) for v in b], "area": round(float(b[2] * b[3] * rng.uniform(0.5, 1.0)), 2),
                "iscrowd": int(rng.rand() < 0.01),
            })
        kept = rng.rand(n_gt) < 0.85
        found, found_cats = gt[kept], cats[kept]
        noise = rng.normal(0, 0.08, found.shape) * np.concatenate([found[:, 2:], found[:, 2:]], 1)
        true_like = np.round(found + noise, 2)
        true_like[:, 2:] = np.maximum(true_like[:, 2:], 1)
        n_fp = 100 - len(true_like)
        dets = np.concatenate([true_like, boxes(rng, n_fp, width, height)])
        det_cats = np.concatenate([found_cats, rng.choice(CATEGORY_IDS, n_fp)])
        scores = np.concatenate([rng.uniform(0.3, 1.0, len(true_like)), rng.uniform(0.0, 0.7, n_fp)])
        scores = np.round(scores, 3)  # ties
        for b, c, s in zip(dets, det_cats, scores):
            detections.append({"image_id": image_id, "category_id": int(c),
                               "bbox": [float(v) for v in b], "score": float(s)})
    categories = [{"id": c, "name": f"category_{c}", "supercategory": "thing"} for c in CATEGORY_IDS]
    return {"images": images, "annotations": annotations, "categories": categories}, detections


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="folder to write gt.json and dt.json into")
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    gt, dt = make(np.random.RandomState(args.seed), args.images)
    for name, obj in (("gt.json", gt), ("dt.json", dt)):
        with open(os.path.join(args.out, name), "w") as f:
            json.dump(obj, f)
    print(f"{args.out}: {len(gt['images'])} images, {len(gt['categories'])} categories, "
          f"{len(gt['annotations'])} ground-truth boxes, {len(dt)} detections")


if __name__ == "__main__":
    main()
