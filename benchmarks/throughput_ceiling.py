"""B2's yardsticks: the machine's ceilings (matrix multiply, the UNet's widest 3x3 convolution)
and the refiner UNet's FLOPs per image, counted with `torch.utils.flop_counter`.

Precisions: ``fp32`` (strict float32 matrix products; convolutions as torch runs them by
default, which on CUDA allows TF32 in cuDNN), ``tf32`` (float32 tensors, TF32 matrix units) and
``bf16`` (bfloat16 tensors). On the CPU only ``fp32`` is measured by default.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from diffusevae.config import Config, to_dict
from diffusevae.presets import resolve
from diffusevae.core.diffusion import Schedule, get_formulation, training_loss
from diffusevae.core.unet import UNet

from common import timed

DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16}


@contextlib.contextmanager
def matmul_precision(precision: str):
    """Strict float32 products for ``fp32``, TF32 for ``tf32`` (as torch.backends says)."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def matmul_ceiling(sizes: tuple[int, ...], device: torch.device, seconds: float,
                   precision: str = "fp32") -> dict:
    """GFLOP/s of n x n matrix products (2 n^3 FLOPs), the best over sizes and runs."""
    by_size = {}
    with matmul_precision(precision):
        for n in sizes:
            a = torch.randn(n, n, device=device, dtype=DTYPES[precision])
            b = torch.randn(n, n, device=device, dtype=DTYPES[precision])
            times = timed(lambda: a @ b, device, reps=5, min_seconds=seconds)
            by_size[str(n)] = 2 * n**3 / min(times) / 1e9
    return {"gflops": max(by_size.values()), "gflops_by_size": by_size}


def widest_conv(unet: UNet, x_in: torch.Tensor, t: torch.Tensor) -> dict:
    """The UNet's 3x3 convolution with the most FLOPs per image: where its ceiling is measured."""
    seen = []

    def hook(m: nn.Conv2d, inputs: tuple, out: torch.Tensor) -> None:
        if m.kernel_size == (3, 3):
            seen.append({"in_channels": m.in_channels, "out_channels": m.out_channels,
                         "size": inputs[0].shape[-1], "stride": m.stride[0],
                         "flops_per_image": 2 * m.in_channels * m.out_channels * 9
                         * out.shape[-2] * out.shape[-1]})

    handles = [m.register_forward_hook(hook) for m in unet.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.inference_mode():
            unet(x_in[:1], t[:1])
    finally:
        for h in handles:
            h.remove()
    return max(seen, key=lambda c: c["flops_per_image"])


def conv_ceiling(conv: dict, batch: int, device: torch.device, seconds: float,
                 precision: str = "fp32") -> dict:
    """GFLOP/s of that convolution (with bias) at `batch`, the better of NCHW and channels_last."""
    dtype = DTYPES[precision]
    x = torch.randn(batch, conv["in_channels"], conv["size"], conv["size"], device=device,
                    dtype=dtype)
    w = torch.randn(conv["out_channels"], conv["in_channels"], 3, 3, device=device, dtype=dtype)
    bias = torch.randn(conv["out_channels"], device=device, dtype=dtype)
    by_format = {}
    with torch.inference_mode():
        for name, fmt in (("contiguous", torch.contiguous_format),
                          ("channels_last", torch.channels_last)):
            xf, wf = x.contiguous(memory_format=fmt), w.contiguous(memory_format=fmt)
            times = timed(lambda: F.conv2d(xf, wf, bias, stride=conv["stride"], padding=1),
                          device, reps=5, min_seconds=seconds)
            by_format[name] = conv["flops_per_image"] * batch / min(times) / 1e9
    return {"batch": batch, "gflops": max(by_format.values()), "gflops_by_memory_format": by_format}


def preset_config(preset: str, unet_overrides: dict) -> Config:
    """The preset's config, with the budget's changes to its UNet."""
    return resolve(preset, overrides={f"unet.{k}": v for k, v in unet_overrides.items()})


def random_unet(cfg: Config, device: torch.device) -> UNet:
    """The preset's refiner UNet with every layer at PyTorch's default init: speed does not
    depend on the weights, and the zero-initialised layers would make eps identically zero,
    leaving the agreement checks nothing to compare."""
    torch.manual_seed(0)
    unet = UNet(cfg.unet)
    for m in unet.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.reset_parameters()  # undoes the zero init of the residual branches and conv_out
    return unet.to(device).eval()


def count_flops(fn: Callable) -> tuple[int, dict[str, int]]:
    """FLOPs of `fn` (convolutions, matrix products, attention; not elementwise ops), by op."""
    with FlopCounterMode(display=False) as counter:
        fn()
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), by_op


def model_facts(cfg: Config, unet: UNet, device: torch.device) -> dict:
    """Size, forward FLOPs an image, training FLOPs an image, and the widest 3x3 convolution."""
    c, s = cfg.unet.channels, cfg.unet.image_size
    x_in = torch.randn(2, unet.in_channels, s, s, device=device)
    t = torch.full((2,), 500, dtype=torch.long, device=device)
    with torch.inference_mode():
        forward, by_op = count_flops(lambda: unet(x_in[:1], t[:1]))
    x0 = torch.rand(2, c, s, s, device=device) * 2 - 1
    schedule, form = Schedule.from_config(cfg.diffusion), get_formulation(cfg.diffusion.form)
    train, _ = count_flops(lambda: training_loss(unet, schedule, form, x0, x_hat=x0).backward())
    unet.zero_grad(set_to_none=True)
    return {"unet": to_dict(cfg.unet), "parameters": unet.num_parameters(),
            "formulation": cfg.diffusion.form, "forward_flops_per_image": forward,
            "forward_flops_by_op": by_op, "training_flops_per_image": train // 2,
            "widest_conv": widest_conv(unet, x_in, t)}


def measure_ceilings(presets: dict[str, Config], batches: dict[str, tuple[int, ...]],
                     precisions: tuple[str, ...], sizes: tuple[int, ...], seconds: float,
                     device: torch.device) -> tuple[dict, dict]:
    """(the ceilings, each preset's model facts). ``ceiling["matmul"]`` and ``["conv"]`` are
    the fp32 ones (what the CPU budgets judge by); every precision's are under ``by_precision``.
    """
    ceiling: dict = {"by_precision": {p: {"matmul": matmul_ceiling(sizes, device, seconds, p),
                                          "conv": {}} for p in precisions}}
    models = {}
    for preset, cfg in presets.items():
        models[preset] = model_facts(cfg, random_unet(cfg, device), device)
        conv = models[preset]["widest_conv"]
        for p in precisions:
            if p == "tf32":  # convolutions have no separate TF32 switch here: fp32's is theirs
                continue
            ceiling["by_precision"][p]["conv"][preset] = {
                str(b): conv_ceiling(conv, b, device, seconds, p)
                for b in sorted({*batches[preset]})}
    fp32 = ceiling["by_precision"]["fp32"]
    ceiling["matmul"], ceiling["conv"] = fp32["matmul"], fp32["conv"]
    return ceiling, models
