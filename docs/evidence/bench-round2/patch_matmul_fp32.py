"""fp32 UNETR-B fine-tune step, 4 crops 96^3: which patch-matmul levers help in fp32? interleaved, 1 warm + 3 reps."""

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
    "load",
    open("/proc/loadavg").read().strip(),
    torch.backends.cpu.get_cpu_capability(),
    os.environ.get("ONEDNN_MAX_CPU_ISA"),
    flush=True,
)
kw = unetr_kwargs(False)
torch.manual_seed(0)
base = UNETR(**kw, num_layers=12, patch_size=16)
b = seg_batches(2, 4, 96, 14, 0)
loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
cases = {}
for name in ("sdpa only", "sdpa+patch embed", "sdpa+patch embed+transposed"):
    m = use_fused_attention(copy.deepcopy(base))
    if "patch" in name:
        use_patch_matmul(m, transposed=name.endswith("transposed"))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=1e-5, fused=True)
    losses = []

    def step(m=m, opt=opt, losses=losses, batches=itertools.cycle(b)):
        d = next(batches)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(m(d["image"]), d["label"])
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
ref = statistics.median(times["sdpa only"])
for k, v in times.items():
    print(
        f"{k:30s} median {statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})  sdpa-only/this {ref / statistics.median(v):.2f}x  losses",
        [round(x, 4) for x in cases[k][1]],
    )
print("load", open("/proc/loadavg").read().strip())
