"""PyTorch twin of `examples/sample_latency.rs`: the same model (exported by `diffuse export
--diffusers DIR`, loaded as diffusers' UNet2DModel), DPM-Solver++(2M) from diffusers, classifier-
free guidance 2 on class 7 against the null class, under torch.inference_mode.

    python3 scripts/sample_latency_torch.py DIR [STEPS] [ROUNDS]

Prints `RESULT latency B=1 <seconds> s` and `RESULT sample B=64 <images/s> img/s` (medians).
Environment: TORCH_THREADS (2); PyTorch's strong CPU settings, each opt-in, as in the team's
shared/bench reference: TORCH_AUTOCAST=bf16 (autocast around the denoiser), CHANNELS_LAST=1
(NHWC model and input), TORCH_COMPILE=1 (torch.compile; its first calls compile, outside the
timing).
"""
import os
import statistics
import sys
import time

import torch
from diffusers import DPMSolverMultistepScheduler, UNet2DModel

folder = sys.argv[1]
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 20
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 10
torch.set_num_threads(int(os.environ.get("TORCH_THREADS", "2")))
autocast = os.environ.get("TORCH_AUTOCAST") == "bf16"
channels_last = os.environ.get("CHANNELS_LAST") == "1"

unet = UNet2DModel.from_pretrained(os.path.join(folder, "unet")).eval()
if channels_last:
    unet = unet.to(memory_format=torch.channels_last)
if os.environ.get("TORCH_COMPILE") == "1":
    unet = torch.compile(unet)
sched = DPMSolverMultistepScheduler.from_pretrained(
    os.path.join(folder, "scheduler"), algorithm_type="dpmsolver++", solver_order=2
)
null_class = unet.config.num_class_embeds - 1
shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)


def sample(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *shape), generator=g)
    labels = torch.cat([torch.full((n,), 7), torch.full((n,), null_class)])
    sched.set_timesteps(steps)
    for t in sched.timesteps:
        xin = torch.cat([x, x])
        if channels_last:
            xin = xin.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = unet(xin, t, class_labels=labels).sample
        cond, uncond = out.float().chunk(2)
        x = sched.step(uncond + 2.0 * (cond - uncond), t, x).prev_sample
    return x


def timed(n, seed):
    start = time.perf_counter()
    sample(n, seed)
    return time.perf_counter() - start


print(f"model {folder} steps {steps} autocast {autocast} channels_last {channels_last}")
with torch.inference_mode():
    for s in range(2):
        timed(1, s)
    one = [timed(1, 100 + s) for s in range(rounds)]
    print(f"RESULT latency B=1 {statistics.median(one):.4f} s")
    timed(64, 0)
    many = [timed(64, 200 + s) for s in range(max(2, -(-rounds // 4)))]
    print(f"RESULT sample B=64 {64 / statistics.median(many):.2f} img/s")
