"""Full-size weight files with the layouts of torchvision's published ones
(random values: the published files cannot be downloaded here), for timing
how long `retinanet` takes to load them (BENCHMARKS.md, "Loading weights").

    python3 benchmarks/full_size_weights.py DIR    # torch 2.9, torchvision 0.24

Writes DIR/resnet50.pth (resnet50-0676ba61.pth's layout),
DIR/retinanet_resnet50_fpn_coco.pth (retinanet_resnet50_fpn_coco-eeacb38b.pth's)
and DIR/retinanet_resnet50_fpn_v2_coco.pth (the v2 file's).
"""
import sys
from pathlib import Path

import torch
from torchvision.models import resnet50
from torchvision.models.detection import retinanet_resnet50_fpn, retinanet_resnet50_fpn_v2
from torchvision.ops import misc as misc_nn_ops


def frozen(model):
    """As the published detector files: FrozenBatchNorm2d, so no
    num_batches_tracked entries."""
    return {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


def main(out):
    out.mkdir(parents=True, exist_ok=True)
    torch.save(resnet50(weights=None).state_dict(), out / "resnet50.pth")
    v1 = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91,
                                norm_layer=misc_nn_ops.FrozenBatchNorm2d)
    torch.save(frozen(v1), out / "retinanet_resnet50_fpn_coco.pth")
    v2 = retinanet_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=91,
                                   norm_layer=misc_nn_ops.FrozenBatchNorm2d)
    torch.save(frozen(v2), out / "retinanet_resnet50_fpn_v2_coco.pth")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
