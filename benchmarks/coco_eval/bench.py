"""Times COCO bbox evaluation side by side: `retinanet eval --gt --dt`,
faster-coco-eval and pycocotools, on the same files, and checks that all
three give the same 12 stats.

    python3 benchmarks/coco_eval/make_case.py /tmp/coco_case
    python3 benchmarks/coco_eval/bench.py /tmp/coco_case [--bin target/release/retinanet] [--repeat 3]

retinanet: wall time of the whole process (start, JSON parsing, evaluation,
printing), median of --repeat runs. The Python tools run in a fresh
interpreter each; their time is measured inside it and split into loading
(COCO(gt) + loadRes(dt)) and evaluate + accumulate + summarize; median of
--repeat runs (pycocotools: one run, it is slow). Python start-up and
imports are not counted for them.
"""

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import time


def worker(tool, case):
    """Runs one Python evaluation and prints {"load", "eval", "stats"} as JSON."""
    if tool == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval as Eval
    else:
        from faster_coco_eval import COCO, COCOeval_faster as Eval
    with contextlib.redirect_stdout(io.StringIO()):
        t0 = time.perf_counter()
        gt = COCO(os.path.join(case, "gt.json"))
        dt = gt.loadRes(os.path.join(case, "dt.json"))
        t1 = time.perf_counter()
        E = Eval(gt, dt, "bbox")
        E.evaluate()
        E.accumulate()
        E.summarize()
        t2 = time.perf_counter()
    print(json.dumps({"load": t1 - t0, "eval": t2 - t1, "stats": [float(s) for s in E.stats[:12]]}))


def run_python(tool, case):
    out = subprocess.run([sys.executable, __file__, "--worker", tool, case],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run_ours(binary, case):
    t0 = time.perf_counter()
    out = subprocess.run([binary, "eval", "--gt", os.path.join(case, "gt.json"),
                          "--dt", os.path.join(case, "dt.json"), "--json"],
                         check=True, capture_output=True, text=True).stdout
    wall = time.perf_counter() - t0
    return {"wall": wall, "stats": json.loads(out)["stats"]}


def version(module):
    from importlib.metadata import version as v
    return v(module)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("case", help="folder with gt.json and dt.json (see make_case.py)")
    parser.add_argument("--bin", default="target/release/retinanet", help="the retinanet binary")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.case)

    ours = [run_ours(args.bin, args.case) for _ in range(args.repeat)]
    fast = [run_python("faster_coco_eval", args.case) for _ in range(args.repeat)]
    slow = [run_python("pycocotools", args.case)]

    ours_wall = statistics.median(r["wall"] for r in ours)
    rows = [("retinanet eval (whole process)", None, None, ours_wall)]
    for name, runs in ((f"faster-coco-eval {version('faster-coco-eval')}", fast),
                       (f"pycocotools {version('pycocotools')}", slow)):
        load = statistics.median(r["load"] for r in runs)
        ev = statistics.median(r["eval"] for r in runs)
        rows.append((name, load, ev, load + ev))

    fmt = lambda v: "-" if v is None else f"{v:.2f}"
    print(f"{'tool':34s} {'load s':>8s} {'eval+acc+sum s':>15s} {'total s':>8s} {'vs retinanet':>13s}")
    for name, load, ev, total in rows:
        print(f"{name:34s} {fmt(load):>8s} {fmt(ev):>15s} {total:8.2f} {total / ours_wall:12.1f}x")
    reference = slow[0]["stats"]
    for name, stats in (("retinanet", ours[0]["stats"]), ("faster-coco-eval", fast[0]["stats"])):
        diff = max(abs(a - b) for a, b in zip(stats, reference))
        print(f"{name} vs pycocotools: max |stat difference| = {diff:.3g}"
              + (" (bit-identical)" if stats == reference else ""))
    print("12 stats (pycocotools):", " ".join(f"{s:.4f}" for s in reference))


if __name__ == "__main__":
    sys.exit(main())
