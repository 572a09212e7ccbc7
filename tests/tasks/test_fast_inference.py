"""Fast inference: sampler loops that do only per-step work, channels-last, torch.compile.

The compiled tests share one tiny UNet architecture, layout (channels-last, what a loaded run
gets on the CPU) and batch shape (4 images, 2 steps), so torch compiles once per process (about
30 s on a 2-core CPU with a cold inductor cache, a few seconds with a warm one) and the CLI test
reuses that work.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import run_cli as run
from diffusevae.config import SampleConfig
from diffusevae.core.diffusion import Schedule, get_formulation, respaced_timesteps
from diffusevae.model.pipeline import DiffuseVAE, _has_cpp_compiler
from diffusevae.rng import randn_like_per_sample, sample_generators
from diffusevae.core.samplers import SAMPLERS, ddim, dpmpp_2m
from oracles import tiny_pipeline as _pipe

SCHEDULE = Schedule.linear(1000, 1e-4, 0.02)
SHAPE = (1, 4, 4)
FAST = dict(n=4, batch_size=4, steps=2, channels_last=True)  # as every compiled test runs
needs_compiler = pytest.mark.skipif(not _has_cpp_compiler(),
                                    reason="torch.compile on the CPU needs a C++ compiler")


def dummy_eps(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.tanh(y) * (t.to(y.dtype) / 1000).reshape(-1, 1, 1, 1) + 0.05


def images(pipe, **settings) -> torch.Tensor:
    return torch.cat([g.images for _, g in pipe.iter_generate(SampleConfig(**settings))])


# --------------------------------------------------------------------------------------------
# Sampler loops: everything but the network and the noise is built before the first step
# --------------------------------------------------------------------------------------------

class OpLog(TorchDispatchMode):
    """Every aten op run, with whether it read a scalar back to Python (`.item()`, `float()`,
    a host-device sync on a GPU) or touched a float64 tensor."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, bool, bool]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [a for a in (*args, *(kwargs or {}).values()) if isinstance(a, torch.Tensor)]
        self.ops.append((str(func.overloadpacket), func.overloadpacket is
                         torch.ops.aten._local_scalar_dense,
                         any(t.dtype == torch.float64 for t in tensors)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("sampler,options", [("ddpm", {"var_type": "fixedlarge"}),
                                             ("ddim", {"eta": 0.5}), ("dpmpp_2m", {})])
def test_the_sampling_loop_reads_no_scalars_and_does_no_float64_work(sampler, options):
    """After the first network call: no scalar read back from a tensor, no float64 tensor (the
    coefficients are Python floats made once per call) and no timestep tensor built per step."""
    log, first_call = OpLog(), []

    def eps_fn(y, t):
        if not first_call:
            first_call.append(len(log.ops))
        return dummy_eps(y, t)

    gens = sample_generators(0, range(3))
    y_T = randn_like_per_sample(gens, SHAPE, "cpu", torch.float32)
    clip = get_formulation("form2").clip_fn(torch.full((3, *SHAPE), 0.2))
    with log:
        SAMPLERS[sampler](eps_fn, y_T, SCHEDULE, respaced_timesteps(1000, 8, "quad"),
                          generators=gens, clip_fn=clip, **options)
    loop = log.ops[first_call[0]:]
    assert loop and not any(scalar for _, scalar, _ in loop), "a scalar read inside the loop"
    assert not any(f64 for _, _, f64 in loop), "float64 work inside the loop"
    assert not any(name in ("aten.full", "aten.fill_") for name, _, _ in loop)


def reference_ddim(eps_fn, y, taus, eta, gens):
    """DDIM (Song et al. 2021, eq. 12) read off the paper, one step at a time, in float64."""
    abar = SCHEDULE.alpha_bar
    for k in reversed(range(len(taus))):
        a_t = abar[taus[k]]
        a_prev = abar[taus[k - 1]] if k > 0 else torch.tensor(1.0, dtype=torch.float64)
        eps = eps_fn(y, torch.full((len(y),), int(taus[k])))
        y0 = (y - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        sigma = eta * ((1 - a_prev) / (1 - a_t)).sqrt() * (1 - a_t / a_prev).sqrt()
        y = a_prev.sqrt() * y0 + (1 - a_prev - sigma**2).sqrt() * eps
        if k > 0 and eta > 0:
            y = y + sigma * randn_like_per_sample(gens, y.shape[1:], y.device, y.dtype)
    return y


def reference_dpmpp_2m(eps_fn, y, taus):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) in log-SNR time, one step at a time."""
    abar = SCHEDULE.alpha_bar
    lam = lambda a: 0.5 * (a / (1 - a)).log()  # noqa: E731
    y0_prev = h_prev = None
    for k in reversed(range(len(taus))):
        a_t = abar[taus[k]]
        eps = eps_fn(y, torch.full((len(y),), int(taus[k])))
        y0 = (y - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        if k == 0:  # into alpha_bar = 1: the prediction itself
            return y0
        a_s = abar[taus[k - 1]]
        h = lam(a_s) - lam(a_t)
        d = y0 if y0_prev is None else (1 + h / (2 * h_prev)) * y0 - h / (2 * h_prev) * y0_prev
        y = ((1 - a_s) / (1 - a_t)).sqrt() * y - a_s.sqrt() * torch.expm1(-h) * d
        y0_prev, h_prev = y0, h
    return y


@pytest.mark.parametrize("spacing", ["uniform", "trailing"])
def test_precomputed_coefficients_match_a_step_by_step_reference(spacing):
    """The samplers' coefficients, computed once per call, against the formulas evaluated at
    each step (DDPM is DDIM with eta = 1 on these coefficients: core/test_samplers.py)."""
    taus = respaced_timesteps(1000, 12, spacing)
    y_T = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for eta in (0.0, 0.6):
        got = ddim(dummy_eps, y_T, SCHEDULE, taus, generators=sample_generators(1, range(3)),
                   eta=eta)
        want = reference_ddim(dummy_eps, y_T, taus, eta, sample_generators(1, range(3)))
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(dpmpp_2m(dummy_eps, y_T, SCHEDULE, taus),
                               reference_dpmpp_2m(dummy_eps, y_T, taus), atol=1e-10, rtol=1e-10)


# --------------------------------------------------------------------------------------------
# channels_last
# --------------------------------------------------------------------------------------------

def test_channels_last_gives_the_images_of_the_contiguous_layout():
    pipe = _pipe()
    seen = []
    pipe.unet.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    contiguous = images(pipe, n=5, steps=3, batch_size=5, channels_last=False)
    assert not pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert not seen[-1].is_contiguous(memory_format=torch.channels_last)
    nhwc = images(pipe, n=5, steps=3, batch_size=5, channels_last=True)
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert not pipe.unet.conv_in.weight.is_inference()  # converted outside inference mode
    assert seen[-1].is_contiguous(memory_format=torch.channels_last)  # the input follows
    torch.testing.assert_close(nhwc, contiguous, atol=1e-5, rtol=0)
    assert contiguous.std() > 0.1  # the images are not trivially alike


def test_a_loaded_pipeline_chooses_the_layout_a_given_unet_is_left_alone(tmp_path):
    given = _pipe()
    images(given, n=1, steps=1)
    assert given.channels_last is None  # it may be a model in training: not converted
    assert given.unet.conv_in.weight.is_contiguous()
    given.save_pretrained(tmp_path)
    loaded = DiffuseVAE.from_pretrained(tmp_path)
    assert loaded.channels_last is True  # automatic: on for the CPU
    assert loaded.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert loaded.unet.conv_in.weight.requires_grad  # converted outside inference mode
    loaded.use_channels_last(False)
    images(loaded, n=1, steps=1)  # channels_last=None keeps the pipeline's layout
    assert loaded.channels_last is False and loaded.unet.conv_in.weight.is_contiguous()
    assert DiffuseVAE.from_pretrained(tmp_path, channels_last=False).channels_last is False


# --------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------

@needs_compiler
def test_compiled_sampling_gives_the_eager_images():
    pipe = _pipe()
    keys = set(pipe.unet.state_dict())
    eager = images(pipe, **FAST)
    compiled = images(pipe, **FAST, compile=True)
    assert pipe.compiled and set(pipe.unet.state_dict()) == keys  # compiled in place
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=0)
    assert eager.std() > 0.1
    other = images(pipe, **FAST, compile=True, seed=1)  # the graph computes: no stale result
    assert (other - eager).abs().max() > 0.1


@needs_compiler
def test_sample_compile_on_the_command_line(trained_run, tmp_path, capsys, monkeypatch):
    """--compile compiles, draws the images of an eager run, is recorded, and does not stop a
    resume."""
    compiled_with, compile_pipe = [], DiffuseVAE.compile
    monkeypatch.setattr(DiffuseVAE, "compile",
                        lambda pipe, **kw: compiled_with.append(kw) or compile_pipe(pipe, **kw))
    common = ["sample", "--run", trained_run, "--n", 4, "--batch-size", 4, "--steps", 2]
    assert run(*common, "--out", tmp_path / "eager") == 0
    assert compiled_with == []
    assert run(*common, "--compile", "--out", tmp_path / "compiled") == 0
    assert compiled_with == [{}]
    eager = np.load(tmp_path / "eager" / "samples.npz")["images"].astype(int)
    compiled = np.load(tmp_path / "compiled" / "samples.npz")["images"].astype(int)
    assert np.abs(compiled - eager).max() <= 1  # uint8: float rounding may move one level
    record = json.loads((tmp_path / "compiled" / "sampling.json").read_text())
    assert record["compile"] is True and record["channels_last"] is None
    capsys.readouterr()
    assert run(*common, "--no-channels-last", "--out", tmp_path / "compiled", "--resume") == 0
    out = capsys.readouterr()
    assert "already holds" in out.out + out.err
    assert run(*common, "--seed", 3, "--out", tmp_path / "compiled", "--resume") == 2


def test_a_smaller_last_batch_compiles_once_more_and_then_never_again():
    """dynamic=False: one graph per batch shape (counted with a backend that runs eagerly, so
    no code is generated)."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(example_inputs)
        return gm.forward

    torch.compiler.reset()  # graphs of other tests count towards torch's recompile limit
    pipe = _pipe().compile(backend=counting_backend)
    images(pipe, n=7, steps=2, batch_size=3)  # batches of 3, 3 and 1
    assert len(graphs) == 2
    images(pipe, n=7, steps=2, batch_size=3)
    assert len(graphs) == 2
