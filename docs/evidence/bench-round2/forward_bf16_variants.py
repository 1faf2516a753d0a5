"""UNETR-B eval forward on 4 windows of 96^3 (the Predictor's call): bf16 as autocast vs a bf16 network, layouts."""

import copy
import statistics
import sys
import time

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))  # the repository root
from bench.workloads import unetr_kwargs
from medssl.networks.unetr import UNETR

torch.set_num_threads(2)
print("load", open("/proc/loadavg").read().strip(), torch.backends.cpu.get_cpu_capability(), flush=True)
torch.manual_seed(0)
net = UNETR(**unetr_kwargs(False), num_layers=12, patch_size=16).eval()
x = torch.rand(4, 1, 96, 96, 96)
cl = torch.channels_last_3d
nets = {
    "fp32": (net, x, False),
    "autocast bf16": (net, x, True),
    "autocast bf16 channels-last": (copy.deepcopy(net).to(memory_format=cl), x.contiguous(memory_format=cl), True),
    "bf16 network": (copy.deepcopy(net).bfloat16(), x.bfloat16(), False),
    "bf16 network channels-last": (
        copy.deepcopy(net).to(dtype=torch.bfloat16, memory_format=cl),
        x.bfloat16().contiguous(memory_format=cl),
        False,
    ),
}


def run(m, inp, ac):
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=ac):
        return m(inp).float().argmax(1)


ref = run(net, x, False)
times = {k: [] for k in nets}
for k, v in nets.items():
    lab = run(*v)
    print("warm", k, "agreement with fp32", round((lab == ref).float().mean().item(), 4), flush=True)
for _ in range(3):
    for k, v in nets.items():
        t = time.perf_counter()
        run(*v)
        times[k].append(time.perf_counter() - t)
base = statistics.median(times["fp32"])
for k, v in times.items():
    print(
        f"{k:30s} {statistics.median(v):.2f} s ({min(v):.2f}-{max(v):.2f})  fp32/this {base / statistics.median(v):.2f}x",
        flush=True,
    )
print("load", open("/proc/loadavg").read().strip())
