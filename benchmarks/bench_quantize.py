"""int8 and bf16 against fp32 for one trained run: size, test error and CPU latency, one run.

    python benchmarks/bench_quantize.py DIR [--repeats K] [--out FILE.json]

DIR is the output folder of a finished train/repro run (net1989 or a convnet of the family).
For its first replica:
  size        bytes of the conv / linear weights and of everything else (biases, scales)
  error       test error of fp32 (the torch.nn form of the net), int8 (PT2E PTQ with the x86
              inductor quantizer, calibrated on 512 training digits) and bf16 (the fp32 module
              cast to bfloat16), and of the int8 graph compiled (the kernels that run)
  latency     one forward pass at batch 1 and at batch 256, one thread: fp32 eager, fp32
              compiled (torch.compile, inductor: the fair baseline for compiled int8), int8
              compiled (inductor lowers the quantize / dequantize pairs to oneDNN int8
              convolutions and matrix products) and bf16 eager. Each figure is the median of
              the repeats (each repeat times a loop of calls lasting at least 0.2 s, after a
              warm-up); the variants are interleaved within each repeat and every ratio is
              against fp32 eager timed in the same run.
The machine may be shared: the JSON records the load average; only ratios within one run count.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(var, "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from backproplab.commands.quantize import load_trained  # noqa: E402
from backproplab.data import load_dataset  # noqa: E402
from backproplab.experiments import quantize as qz  # noqa: E402


def per_call(fn, x, min_seconds=0.2) -> float:
    """Seconds a call: a loop of calls lasting at least min_seconds."""
    with torch.no_grad():
        n, t0 = 0, time.perf_counter()
        while True:
            fn(x)
            n += 1
            dt = time.perf_counter() - t0
            if dt >= min_seconds:
                return dt / n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", help="write the JSON here too")
    a = ap.parse_args()
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    rec, cfg, reps = load_trained(a.dir)
    data = load_dataset(cfg.data.source, cfg.data.n_train, cfg.data.n_test)
    fp32 = qz.deployable(cfg.model, reps[0])
    int8 = qz.ptq(fp32, data.train_x[:qz.CAL_DIGITS])
    b16 = qz.bf16(fp32)
    t0 = time.perf_counter()
    fp32_c = torch.compile(qz.deployable(cfg.model, reps[0]))
    int8_c = torch.compile(int8)
    with torch.no_grad():  # compile both batch sizes now, outside the timing
        for b in (1, 256):
            fp32_c(data.test_x[:b])
            int8_c(data.test_x[:b])
    compile_s = time.perf_counter() - t0
    variants = {"fp32_eager": (fp32, torch.float32), "fp32_compiled": (fp32_c, torch.float32),
                "int8_compiled": (int8_c, torch.float32), "bf16_eager": (b16, torch.bfloat16)}
    res = {"run": rec["id"], "dir": str(a.dir), "model": cfg.model.name, "config": cfg.name,
           "params": sum(int(v.size) for v in reps[0].values()),
           "size": {k: qz.weight_bytes(m) for k, m in (("fp32", fp32), ("int8", int8), ("bf16", b16))},
           "test_error": {"fp32": qz.error(fp32, data.test_x, data.test_labels),
                          "int8": qz.error(int8, data.test_x, data.test_labels),
                          "int8_compiled": qz.error(int8_c, data.test_x, data.test_labels),
                          "bf16": qz.error(b16, data.test_x, data.test_labels, torch.bfloat16)},
           "compile_seconds": round(compile_s, 1), "latency_s": {}, "ratio_vs_fp32_eager": {}}
    res["size"]["weights_ratio"] = res["size"]["fp32"]["weights"] / res["size"]["int8"]["weights"]
    for b in (1, 256):
        x = data.test_x[:b]
        times = {k: [] for k in variants}
        for k, (m, dt) in variants.items():  # warm-up
            per_call(m, x.to(dt), 0.05)
        for _ in range(a.repeats):
            for k, (m, dt) in variants.items():
                times[k].append(per_call(m, x.to(dt)))
        med = {k: statistics.median(v) for k, v in times.items()}
        res["latency_s"][f"batch{b}"] = med
        res["ratio_vs_fp32_eager"][f"batch{b}"] = {k: med["fp32_eager"] / v for k, v in med.items()}
    res.update(repeats=a.repeats, seconds=round(time.perf_counter() - t_start, 1), loadavg=os.getloadavg(),
               torch=torch.__version__, machine=platform.machine(), threads=1)
    text = json.dumps(res, indent=1)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
