"""torchvision's RetinaNet timed like `retinanet bench`, for the ratio.

Same fields as `retinanet bench --json`: a full training step (forward,
loss, backward, SGD momentum 0.9) or inference, on random images with 1 to 8
random boxes each, after warm-up, median of the timed steps, peak RSS.

    pip install torch torchvision
    python3 benchmarks/torchvision_bench.py --depth 18 --size 512 --batch 2 --mode train
    python3 benchmarks/torchvision_bench.py --preset shapes   # the shapes preset's model
    python3 benchmarks/torchvision_bench.py --device cuda --precision bf16 --batch 8 --size 640

On CUDA the step ends at torch.cuda.synchronize() and the report adds
"peak_gpu_mib" (torch.cuda.max_memory_allocated). --precision bf16 runs the
forward pass (and loss) under torch.autocast(dtype=torch.bfloat16), as
`retinanet bench --set train.precision=bf16` does; parameters, gradients and
the optimiser stay f32.

Options mirror the config: --width (stem channels; 64 is torchvision's),
--fpn (FPN channels), --head-convs, --head-gn, --ratios, --classes, and
--recipe finetune (FrozenBatchNorm, stem and layer1 frozen: torchvision's
trainable_backbone_layers=3) or scratch (plain BatchNorm, everything trains).
"""
import argparse
import json
import os
import resource
import statistics
import time
from functools import partial

import torch
from torch import nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

# torchvision's anchor scales per base size (its RetinaNet truncates each size to an int).
OCTAVE_SCALES = [1.0, 2 ** (1 / 3), 2 ** (2 / 3)]

PRESETS = {
    # configs/shapes.toml
    "shapes": dict(depth=18, width=16, fpn=64, head_convs=2, head_gn=True, size=128, batch=8,
                   classes=3, sizes=[8, 16, 32, 64, 128], ratios=[1.0], min_size=128, max_size=128),
}


class WideResNet(ResNet):
    """torchvision's ResNet with `width` stem channels (stages width*1..8).
    `init`: "kaiming_fan_out" is ResNet's own conv init, "torch_default"
    keeps nn.Conv2d's (our `model.backbone.init`)."""

    def __init__(self, block, layers, width, norm_layer, init="kaiming_fan_out"):
        nn.Module.__init__(self)
        self._norm_layer = norm_layer
        self.inplanes, self.dilation, self.groups, self.base_width = width, 1, 1, 64
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        # ResNet.__init__'s initialisation, which skipping it above also skips.
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and init == "kaiming_fan_out":
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)


def build(args):
    block, layers = {18: (BasicBlock, [2, 2, 2, 2]), 34: (BasicBlock, [3, 4, 6, 3]),
                     50: (Bottleneck, [3, 4, 6, 3]), 101: (Bottleneck, [3, 4, 23, 3])}[args.depth]
    norm = FrozenBatchNorm2d if args.recipe == "finetune" else nn.BatchNorm2d
    body = WideResNet(block, layers, args.width, norm, getattr(args, "init", "kaiming_fan_out"))
    if args.recipe == "finetune":  # trainable_backbone_layers=3
        for name, p in body.named_parameters():
            if not name.startswith(("layer2", "layer3", "layer4")):
                p.requires_grad_(False)
    c5 = args.width * 8 * block.expansion
    backbone = BackboneWithFPN(body, {"layer2": "0", "layer3": "1", "layer4": "2"},
                               [c5 // 4, c5 // 2, c5], args.fpn,
                               extra_blocks=LastLevelP6P7(args.fpn, args.fpn))
    sizes = tuple(tuple(int(s * k) for k in args.scales) for s in args.sizes)
    anchors = AnchorGenerator(sizes, (tuple(args.ratios),) * len(sizes))
    norm_layer = partial(nn.GroupNorm, 32) if args.head_gn else None
    head = RetinaNetHead(args.fpn, anchors.num_anchors_per_location()[0], args.classes, norm_layer=norm_layer)
    if args.head_convs != 4:
        for sub in (head.classification_head, head.regression_head):
            sub.conv = sub.conv[: args.head_convs]
    width = args.image_width or args.size
    return RetinaNet(backbone, args.classes, anchor_generator=anchors, head=head,
                     min_size=args.min_size or min(args.size, width),
                     max_size=args.max_size or max(args.size, width))


def rss_mib(field):
    """A memory line of /proc/self/status in MiB (0 where there is none), as
    `retinanet bench` reads it: VmRSS before the model is built is the
    interpreter and its libraries, which the peak less it leaves out."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def random_batch(args, gen):
    width = args.image_width or args.size
    images = [torch.randn(3, args.size, width, generator=gen) for _ in range(args.batch)]
    targets = []
    s = torch.tensor([float(width), float(args.size)])
    for _ in range(args.batch):
        n = int(torch.randint(1, 9, (1,), generator=gen))
        wh = (torch.rand(n, 2, generator=gen) * 0.55 + 0.05) * s
        xy = torch.rand(n, 2, generator=gen) * (s - wh)
        boxes = torch.cat([xy, xy + wh], 1)
        targets.append({"boxes": boxes, "labels": torch.randint(0, args.classes, (n,), generator=gen)})
    return images, targets


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", choices=PRESETS)
    p.add_argument("--depth", type=int, default=50)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--fpn", type=int, default=256)
    p.add_argument("--head-convs", type=int, default=4)
    p.add_argument("--head-gn", action="store_true")
    p.add_argument("--classes", type=int, default=80)
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    p.add_argument("--scales", type=float, nargs="+", default=OCTAVE_SCALES,
                   help="scales of each base size (default: torchvision's 1, 2^(1/3), 2^(2/3))")
    p.add_argument("--size", type=int, default=512, help="image height")
    p.add_argument("--image-width", type=int, help="image width (default: --size)")
    p.add_argument("--min-size", type=int)
    p.add_argument("--max-size", type=int)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--mode", choices=["train", "infer"], default="train")
    p.add_argument("--recipe", choices=["finetune", "scratch"], default="scratch")
    p.add_argument("--init", choices=["kaiming_fan_out", "torch_default"], default="kaiming_fan_out")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--precision", choices=["f32", "bf16"], default="f32")
    # A preset sets defaults; flags given on the command line win.
    p.set_defaults(**PRESETS.get(p.parse_known_args()[0].preset, {}))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    start_rss = rss_mib("VmRSS")
    model = build(args).to(device)
    gen = torch.Generator().manual_seed(0)
    images, targets = random_batch(args, gen)
    images = [i.to(device) for i in images]
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)
    model.train(args.mode == "train")
    times = []
    for i in range(2 + args.steps):
        t = time.perf_counter()
        if args.mode == "train":
            with autocast:
                losses = model(images, targets)
                loss = sum(losses.values())
            opt.zero_grad()
            loss.backward()
            opt.step()
        else:
            with torch.no_grad(), autocast:
                model(images)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 2:
            times.append(time.perf_counter() - t)
    median = statistics.median(times)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    report = {"mode": args.mode, "size": args.size, "batch": args.batch, "steps": args.steps,
              "seconds_per_step_median": median, "images_per_second": args.batch / median,
              "peak_rss_mib": peak, "peak_rss_model_mib": peak - start_rss,
              "torch": torch.__version__, "threads": args.threads,
              "device": str(device), "precision": args.precision}
    if device.type == "cuda":
        report["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        report["gpu"] = torch.cuda.get_device_name(device)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
