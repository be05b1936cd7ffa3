"""torch's convolution forward and forward+backward on the shapes of
`cargo bench --bench conv`, with the same thread count.

    python3 benchmarks/conv_torch.py [THREADS]   (default: all cores)
"""
import os
import sys
import time

import torch

threads = int(sys.argv[1]) if len(sys.argv) > 1 else os.cpu_count()
torch.set_num_threads(threads)
CASES = [
    ("3x3 256->256 64x64 n2", 2, 256, 256, 64, 3, 1),
    ("3x3 64->64 24x24 n16", 16, 64, 64, 24, 3, 1),
    ("3x3 16->16 48x48 n16", 16, 16, 16, 48, 3, 1),
    ("7x7/2 3->64 512x512 n2", 2, 3, 64, 512, 7, 2),
    ("3x3 256->256 64x64 n4", 4, 256, 256, 64, 3, 1),
    ("3x3 64->64 128x128 n4", 4, 64, 64, 128, 3, 1),
    ("7x7/2 3->64 512x512 n4", 4, 3, 64, 512, 7, 2),
    ("3x3 64->64 128x128 n2", 2, 64, 64, 128, 3, 1),
    ("3x3 128->128 64x64 n2", 2, 128, 128, 64, 3, 1),
    ("3x3 512->512 16x16 n2", 2, 512, 512, 16, 3, 1),
    ("3x3 256->720 64x64 n2", 2, 256, 720, 64, 3, 1),
    ("3x3 256->256 32x32 n2", 2, 256, 256, 32, 3, 1),
    ("3x3 256->256 16x16 n2", 2, 256, 256, 16, 3, 1),
    ("3x3 64->64 16x16 n8", 8, 64, 64, 16, 3, 1),
    ("3x3 64->64 8x8 n8", 8, 64, 64, 8, 3, 1),
    ("7x7/2 3->16 128x128 n8", 8, 3, 16, 128, 7, 2),
    ("3x3 16->16 32x32 n8", 8, 16, 16, 32, 3, 1),
    ("3x3 64->64 32x32 n8", 8, 64, 64, 32, 3, 1),
    ("3x3 64->64 64x64 n8", 8, 64, 64, 64, 3, 1),
    ("3x3 64->64 48x48 n4", 4, 64, 64, 48, 3, 1),
    ("3x3 128->128 8x8 n8", 8, 128, 128, 8, 3, 1),
    ("3x3 32->32 32x32 n8", 8, 32, 32, 32, 3, 1),
    ("3x3 128->128 56x56 n4", 4, 128, 128, 56, 3, 1),
    ("3x3 128->128 28x28 n4", 4, 128, 128, 28, 3, 1),
    ("3x3 64->64 112x112 n4", 4, 64, 64, 112, 3, 1),
    ("3x3 256->256 28x28 n4", 4, 256, 256, 28, 3, 1),
    ("3x3 512->512 14x14 n4", 4, 512, 512, 14, 3, 1),
]


def median_seconds(f):
    f()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return sorted(times)[2]


print(f"torch {torch.__version__}, {threads} threads")
print(f"{'case':<26} {'torch fwd':>12} {'torch f+b':>12}")
for name, n, c, co, size, k, s in CASES:
    x = torch.randn(n, c, size, size, requires_grad=True)
    w = (torch.randn(co, c, k, k) * 0.1).requires_grad_(True)
    conv = lambda: torch.nn.functional.conv2d(x, w, padding=k // 2, stride=s)
    fwd = median_seconds(lambda: conv())
    fb = median_seconds(lambda: conv().sum().backward())
    print(f"{name:<26} {fwd:>12.4f} {fb:>12.4f}")
