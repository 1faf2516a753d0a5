"""fp32 UNETR-B fine-tune step (levers on), contiguous vs channels_last_3d; 4 crops of 96^3; interleaved."""

import copy
import itertools
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))  # the repository root
from monai.losses import DiceCELoss

from bench.workloads import seg_batches, unetr_kwargs
from medssl.networks.attention import use_fused_attention
from medssl.networks.patch_conv import use_patch_matmul
from medssl.networks.unetr import UNETR

torch.set_num_threads(2)
print(
    open("/proc/loadavg").read().strip(), torch.backends.cpu.get_cpu_capability(), os.environ.get("ONEDNN_MAX_CPU_ISA")
)
kw = unetr_kwargs(False)
torch.manual_seed(0)
base = use_fused_attention(use_patch_matmul(UNETR(**kw, num_layers=12, patch_size=16)))
b = seg_batches(2, 4, 96, 14, 0)
loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
cases = {}
for name, fmt in (("contiguous", torch.contiguous_format), ("channels_last_3d", torch.channels_last_3d)):
    m = copy.deepcopy(base).to(memory_format=fmt)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=1e-5, fused=True)
    losses = []

    def step(m=m, opt=opt, fmt=fmt, losses=losses, batches=itertools.cycle(b)):
        d = next(batches)
        x = d["image"].contiguous(memory_format=fmt)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(m(x), d["label"])
        loss.backward()
        opt.step()
        losses.append(loss.item())

    cases[name] = (step, losses)
times = {k: [] for k in cases}
for k, (s, _) in cases.items():
    t = time.perf_counter()
    s()
    print("warm", k, round(time.perf_counter() - t, 2), flush=True)
for r in range(3):
    for k, (s, _) in cases.items():
        t = time.perf_counter()
        s()
        times[k].append(time.perf_counter() - t)
        print(r, k, round(times[k][-1], 2), flush=True)
for k, v in times.items():
    print(
        k,
        "median",
        round(statistics.median(v), 2),
        "min-max",
        round(min(v), 2),
        round(max(v), 2),
        "losses",
        [round(x, 4) for x in cases[k][1]],
    )
print(
    "ratio contiguous/channels_last",
    statistics.median(times["contiguous"]) / statistics.median(times["channels_last_3d"]),
)
print(open("/proc/loadavg").read().strip())
