"""Predictor on the bench volume (512x512x200, UNETR-B random weights, bf16, overlap 0.5): nearest vs linear label
return, and a cProfile of the default to see where the time beyond the network's forward goes."""

import cProfile
import pstats
import sys
import time

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))  # the repository root
from medssl.inference import Predictor
from medssl.inference.volume import read_volume

torch.set_num_threads(2)
W = sys.argv[1]  # the --workdir of `python -m bench inference` (ct.nii.gz, model.pt)
print("load", open("/proc/loadavg").read().strip(), flush=True)
vol = read_volume(f"{W}/ct.nii.gz")
for interp in ("nearest", "linear"):
    p = Predictor(
        f"{W}/model.pt",
        device="cpu",
        overlap=0.5,
        sw_batch_size=4,
        mode="gaussian",
        progress=False,
        interpolation=interp,
    )
    t = time.perf_counter()
    if interp == "linear":
        prof = cProfile.Profile()
        prof.enable()
    out = p.predict_volume(vol)
    if interp == "linear":
        prof.disable()
    print(interp, round(time.perf_counter() - t, 1), "s", flush=True)
pstats.Stats(prof).sort_stats("cumulative").print_stats(30)
print("load", open("/proc/loadavg").read().strip())
