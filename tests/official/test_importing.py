"""Importing the published DiffuseVAE checkpoints (the official wing: importer.py,
official_unet.py, official_vae.py), checked against outputs of the official code on tiny seeded models
(tests/fixtures/official/README.md) and against the key listings of the real files."""

from __future__ import annotations

import gzip
import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli
from diffusevae.config import SampleConfig
from diffusevae.core.diffusion import Schedule, get_formulation, make_eps_fn, respaced_timesteps
from diffusevae.errors import OfficialCheckpointError
from diffusevae.official.importer import (check_layout, formulation_of, import_official,
                                          infer_unet_config, layout_of, on_meta,
                                          official_vae_config, read_lightning_checkpoint,
                                          split_refiner_state)
from diffusevae.model.network_loading import load_network
from diffusevae.model.pipeline import DiffuseVAE
from diffusevae.core.samplers import ddim
from diffusevae.official.official_unet import build_official_unet
from diffusevae.official.official_vae import OfficialVAE

FIX = Path(__file__).parents[1] / "fixtures" / "official"
REF = load_file(FIX / "reference.safetensors")
REF_DDIM = load_file(FIX / "reference_ddimunet.safetensors")
HEADS = 2  # the tiny models' head count (reference.json)

# name -> (where the target network comes from, its reference tensors, their name prefix)
MODELS = {
    "openai-form1": ("ddpm_form1.ckpt", REF, "form1"),
    "openai-form2": ("ddpm_form2_target.safetensors", REF, "form2"),
    "ddim-form1": ("ddpm_ddimunet_form1_target.safetensors", REF_DDIM, "form1"),
    "ddim-form1-nres1": ("ddpm_ddimunet_form1_nres1_target.safetensors", REF_DDIM,
                         "form1_nres1"),
}


def vae_state() -> dict[str, torch.Tensor]:
    return torch.load(FIX / "vae.ckpt", weights_only=True, map_location="cpu")["state_dict"]


def lightning_file(path: Path, state: dict, callbacks: dict | None = None) -> Path:
    """A checkpoint in the official DDPM layout (PL 1.4.9's top-level keys) around `state`."""
    torch.save({"epoch": 5, "global_step": 600, "pytorch-lightning_version": "1.4.9",
                "state_dict": state,
                "callbacks": callbacks if callbacks is not None else {
                    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint": {
                        "monitor": None, "best_model_path": "/results/x.ckpt"}},
                "optimizer_states": [{"state": {}, "param_groups": [
                    {"lr": 2e-4, "betas": (0.9, 0.999), "params": [0]}]}],
                "lr_schedulers": []}, path)
    return path


def ddpm_file(name: str, tmp_path: Path) -> Path:
    """The DDPM checkpoint of MODELS[name] in the official layout: the fixture's file itself,
    or its stored target network put back (online = target, vae.* = vae.ckpt)."""
    source = FIX / MODELS[name][0]
    if source.suffix == ".ckpt":
        return source
    target = load_file(source)
    online = {k.replace("target_network.", "online_network.", 1): v for k, v in target.items()}
    vae = {f"vae.{k}": v for k, v in vae_state().items()}
    return lightning_file(tmp_path / f"{name}.ckpt", {**online, **target, **vae})


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> dict[str, Path]:
    """Every fixture model imported into its own run folder."""
    root = tmp_path_factory.mktemp("imported")
    runs = {}
    for name in MODELS:
        runs[name] = root / name
        import_official(FIX / "vae.ckpt", ddpm_file(name, root), runs[name], num_heads=HEADS)
    return runs


def close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> bool:
    """Agreement to `rel` of the reference's scale (the fixture's single-pass tolerance)."""
    return float((got - want).abs().max()) <= rel * max(1.0, float(want.abs().max()))


# --------------------------------------------------------------------------------------------
# The networks give the official code's outputs
# --------------------------------------------------------------------------------------------

def test_the_imported_vae_gives_the_reference_outputs(imported):
    vae, _ = load_network(imported["openai-form1"] / "vae", "vae")
    assert isinstance(vae, OfficialVAE) and vae.config.z_dim == 16
    with torch.no_grad():
        mu, logvar = vae.encode(REF["vae_in_x"] * 2 - 1)  # ours takes [-1, 1]; theirs [0, 1]
        x_hat = vae.decode(REF["z"].flatten(1))
    assert close(mu, REF["vae_mu"].flatten(1)) and close(logvar, REF["vae_logvar"].flatten(1))
    assert close(x_hat, REF["x_hat"])


@pytest.mark.parametrize("name", MODELS)
def test_the_imported_unet_is_the_ema_network_and_gives_the_reference_eps(imported, name):
    _, ref, prefix = MODELS[name]
    unet, meta = load_network(imported[name] / "refiner", "refiner")
    assert meta["arch"] == "official" and unet.config.family == name.split("-")[0]
    x_in = torch.cat([REF["unet_x_t"], REF["x_hat"]], dim=1)
    with torch.no_grad():
        eps = unet(x_in, REF["unet_t"].long())
    assert close(eps, ref[f"{prefix}_target_unet_eps"])
    # the online network is another one: importing it by mistake would fail the line above
    assert not close(eps, ref[f"{prefix}_online_unet_eps"], rel=1e-3)


def test_an_imported_pipeline_saves_and_loads_again(imported, tmp_path):
    pipe = DiffuseVAE.from_pretrained(imported["ddim-form1"], channels_last=False)
    pipe.save_pretrained(tmp_path / "copy")
    again = DiffuseVAE.from_pretrained(tmp_path / "copy", channels_last=False)
    assert type(again.unet) is type(pipe.unet) and type(again.vae) is type(pipe.vae)
    x_in = torch.cat([REF["unet_x_t"], REF["x_hat"]], dim=1)
    with torch.no_grad():
        assert torch.equal(again.unet(x_in, REF["unet_t"].long()),
                           pipe.unet(x_in, REF["unet_t"].long()))
        assert torch.equal(again.vae.decode(REF["z"].flatten(1)),
                           pipe.vae.decode(REF["z"].flatten(1)))


def test_the_formulation_and_schedule_are_read_from_the_buffers(imported):
    for name, form in (("openai-form1", "form1"), ("openai-form2", "form2-official")):
        meta = json.loads((imported[name] / "refiner" / "config.json").read_text())
        assert meta["diffusion"] == {"timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02,
                                     "form": form, "p_uncond": 0.0}
        assert meta["imported_from"]["network"].startswith("target_network")


# --------------------------------------------------------------------------------------------
# Our DDIM on the imported runs gives the official sampler's samples
# --------------------------------------------------------------------------------------------

def _official_setup(run: Path, name: str):
    pipe = DiffuseVAE.from_pretrained(run, channels_last=False)
    form = get_formulation(pipe.diffusion.form)
    x_hat = REF["x_hat"]
    eps_fn = make_eps_fn(pipe.unet, form, x_hat)
    return pipe, form, x_hat, eps_fn


def _x_coordinates(y: torch.Tensor, form, x_hat: torch.Tensor, last: bool) -> torch.Tensor:
    """The official trajectory's state for our y: form2 keeps x_hat in it until the end."""
    return y + x_hat if form.shifted and not last else y


@pytest.mark.parametrize("name", MODELS)
def test_one_ddim_step_fed_the_reference_state_matches_it(imported, name):
    _, ref, prefix = MODELS[name]
    _, form, x_hat, eps_fn = _official_setup(imported[name], name)
    trajectory = ref[f"{prefix}_ddim10_trajectory"]  # (10, B, C, H, W), after each step
    taus = respaced_timesteps(1000, 10, "uniform")  # [0, 100, ..., 900], the official map
    schedule = Schedule.linear(1000)
    state = REF["sample_init_noise"]  # y before the first step
    for k in reversed(range(10)):  # one step from tau_k to tau_{k-1}
        got = []
        steps = taus[k - 1:k + 1] if k > 0 else taus[:1]
        with torch.no_grad():
            ddim(eps_fn, state, schedule, steps, clip_fn=form.clip_fn(x_hat), keep_eps=True,
                 callback=lambda i, n, y, y0: got.append(y) if i == 0 else None)
        want = trajectory[9 - k]
        assert float((_x_coordinates(got[0], form, x_hat, k == 0) - want).abs().max()) <= 1e-5
        state = want - x_hat if form.shifted and k > 0 else want


@pytest.mark.parametrize("name", MODELS)
def test_our_ddim_from_the_same_noise_gives_the_official_samples(imported, name):
    _, ref, prefix = MODELS[name]
    pipe, _, x_hat, _ = _official_setup(imported[name], name)
    sample = SampleConfig(n=2, steps=10, sampler="ddim", spacing="uniform", keep_eps=True)
    images = pipe.refine(x_hat, None, [torch.Generator() for _ in range(2)], sample,
                         y_T=REF["sample_init_noise"])
    # A free-running chain amplifies float32 rounding: 1/sqrt(alpha_bar) reaches 61 with these
    # random weights. The fixture allows about 2e-3; here one network pass differs from the
    # reference by up to 4e-6 (another CPU's kernels round differently) and the openai form2
    # sample by 1.98e-3, so the bound keeps a margin. A wrong port moves it by 5e-2 or more.
    assert float((images - ref[f"{prefix}_ddim10_sample"]).abs().max()) <= 2.5e-3


def test_keep_eps_is_a_ddim_setting_that_changes_nothing_where_nothing_is_clipped(imported):
    from diffusevae.errors import ConfigError

    with pytest.raises(ConfigError, match="keep_eps is a DDIM setting"):
        SampleConfig(sampler="dpmpp_2m", keep_eps=True)
    pipe, _, x_hat, _ = _official_setup(imported["openai-form2"], "openai-form2")
    gens = [torch.Generator() for _ in range(2)]
    noise = REF["sample_init_noise"]
    runs = {(clip, keep): pipe.refine(x_hat, None, gens, SampleConfig(
        n=2, steps=4, clip=clip, keep_eps=keep), y_T=noise)
        for clip in (True, False) for keep in (True, False)}
    assert torch.equal(runs[False, True], runs[False, False])  # no clipping: the same steps
    assert not torch.allclose(runs[True, True], runs[True, False])  # clipping: another eps
    with pytest.raises(ConfigError, match="sample.keep_eps off"):
        pipe.invert(REF["x_hat"], SampleConfig(n=2, steps=4, keep_eps=True))


# --------------------------------------------------------------------------------------------
# The real files' layouts map completely onto our networks
# --------------------------------------------------------------------------------------------

def listing(name: str) -> dict:
    with gzip.open(FIX / "full_size_keys" / f"{name}.json.gz", "rt") as f:
        return json.load(f)


INDEX = listing("index")
CONFIGS = [(family, cfg) for cfg in INDEX["configs"] for family in ("ddpm_form1", "ddpm_form2")
           if not cfg.startswith("pyddpmunet")]


@pytest.mark.parametrize("family,cfg", CONFIGS)
def test_a_full_size_listing_maps_completely_onto_our_networks(family, cfg):
    entry = INDEX["configs"][cfg]
    kwargs = next(v for k, v in entry.items() if k.startswith("unet_kwargs"))
    shapes = {k: tuple(v) for k, v in listing(f"{cfg}_{family}").items()}
    parts = split_refiner_state(shapes, cfg)  # refuses any key that fits no part
    # the VAE: where the index gives its arguments (the DDIM-UNet variants share those of the
    # configuration they come from), its listing and the DDPM file's copy both fit it
    vae_kwargs = INDEX["configs"].get(cfg.removeprefix("ddimunet_"), {}).get("vae_kwargs")
    image_size = kwargs.get("resolution") or vae_kwargs["input_res"]
    if vae_kwargs is not None:
        vae_of = next(c for c, e in INDEX["configs"].items() if e.get("vae_kwargs") ==
                      vae_kwargs and (FIX / "full_size_keys" / f"{c}_vae.json.gz").is_file())
        vae_shapes = {k: tuple(v) for k, v in listing(f"{vae_of}_vae").items()}
        assert parts.vae == vae_shapes
        assert official_vae_config(vae_kwargs, vae_shapes, cfg).image_size == image_size
    assert parts.vae
    unet_cfg = infer_unet_config(parts.target, image_size, kwargs["num_heads"], cfg)
    assert parts.online == parts.target  # both networks fit the same architecture
    assert formulation_of(parts.buffers) == ("form1" if family.endswith("1") else
                                             "form2-official")
    # what was inferred is what the official code was constructed with
    assert unet_cfg.base_channels == kwargs["model_channels"]
    assert unet_cfg.channel_mults == tuple(kwargs["channel_mult"])
    assert unet_cfg.num_res_blocks == kwargs["num_res_blocks"]
    levels = range(len(kwargs["channel_mult"]))
    if cfg.startswith("ddimunet"):  # attention listed by pixel size
        want = {image_size // 2 ** lv for lv in levels} & set(kwargs["attention_resolutions"])
    else:  # listed by downsampling factor: CIFAR-10's "16" never matches, so middle only
        want = {image_size // 2 ** lv for lv in levels
                if 2 ** lv in kwargs["attention_resolutions"]}
    assert set(unet_cfg.attn_resolutions) == want
    check_layout(layout_of(on_meta(build_official_unet, unet_cfg)), parts.target, cfg)


def test_the_pytorch_ddpm_style_unet_is_refused_by_name():
    shapes = {k: tuple(v) for k, v in listing("pyddpmunet_cifar10_ddpm_form1").items()}
    parts = split_refiner_state(shapes, "pyddpm")
    with pytest.raises(OfficialCheckpointError, match="time_embedding.timembedding"):
        infer_unet_config(parts.target, 32, 8, "pyddpm")


# --------------------------------------------------------------------------------------------
# What is refused, and how
# --------------------------------------------------------------------------------------------

def _form1_state() -> dict[str, torch.Tensor]:
    return dict(read_lightning_checkpoint(FIX / "ddpm_form1.ckpt")["state_dict"])


def test_a_vae_copy_that_differs_is_refused_naming_the_first_tensor(tmp_path):
    state = _form1_state()
    key = "vae.enc.block_mod.2.c1.weight"
    state[key] = state[key] + 1e-3
    path = lightning_file(tmp_path / "ddpm.ckpt", state)
    with pytest.raises(OfficialCheckpointError, match=r"vae\.enc\.block_mod\.2\.c1\.weight "
                                                      r"differs by up to 0\.001"):
        import_official(FIX / "vae.ckpt", path, tmp_path / "run", num_heads=HEADS)
    assert not (tmp_path / "run").exists()  # nothing written


def test_what_cannot_be_inferred_is_named(tmp_path):
    with pytest.raises(OfficialCheckpointError, match="number of attention heads.*`num_heads`"):
        import_official(FIX / "vae.ckpt", FIX / "ddpm_form1.ckpt", tmp_path / "run")
    stripped = torch.load(FIX / "vae.ckpt", weights_only=True, map_location="cpu")
    del stripped["hyper_parameters"]
    torch.save(stripped, tmp_path / "vae.ckpt")
    with pytest.raises(OfficialCheckpointError, match="image size and the resampling factors"):
        import_official(tmp_path / "vae.ckpt", FIX / "ddpm_form1.ckpt", tmp_path / "run", 2)
    assert not (tmp_path / "run").exists()


def test_swapped_files_unknown_keys_and_wrong_shapes_are_refused(tmp_path):
    with pytest.raises(OfficialCheckpointError, match="is a refiner .* pass it as `ddpm_path`"):
        import_official(FIX / "ddpm_form1.ckpt", FIX / "vae.ckpt", tmp_path / "r1", HEADS)
    state = _form1_state()
    state["target_network.decoder.z_proj.weight"] = torch.zeros(3)
    with pytest.raises(OfficialCheckpointError, match="z_proj.weight is not part of"):
        import_official(FIX / "vae.ckpt", lightning_file(tmp_path / "a.ckpt", state),
                        tmp_path / "r2", HEADS)
    state = _form1_state()
    state["spaced_diffusion.betas"] = torch.zeros(10)
    with pytest.raises(OfficialCheckpointError, match="'spaced_diffusion.betas'"):
        import_official(FIX / "vae.ckpt", lightning_file(tmp_path / "b.ckpt", state),
                        tmp_path / "r3", HEADS)
    state = _form1_state()
    key = "target_network.decoder.middle_block.1.qkv.weight"
    state[key] = state[key][:, :16]
    with pytest.raises(OfficialCheckpointError, match="middle_block.1.qkv.weight has shape"):
        import_official(FIX / "vae.ckpt", lightning_file(tmp_path / "c.ckpt", state),
                        tmp_path / "r4", HEADS)


def test_an_existing_run_is_never_overwritten(imported):
    before = (imported["openai-form1"] / "refiner" / "model.safetensors").read_bytes()
    with pytest.raises(OfficialCheckpointError, match="already exists"):
        import_official(FIX / "vae.ckpt", FIX / "ddpm_form1.ckpt", imported["openai-form1"],
                        HEADS)
    assert (imported["openai-form1"] / "refiner" / "model.safetensors").read_bytes() == before


# --------------------------------------------------------------------------------------------
# Reading never runs code
# --------------------------------------------------------------------------------------------

class _Payload:
    """Unpickling this opens (creates) `marker` for writing: code running at load time."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_crafted_to_run_code_is_refused_without_running_it(tmp_path):
    state = _form1_state()
    # control: loaded unsafely, this file does run code
    lightning_file(tmp_path / "control.ckpt", state, {"x": _Payload(tmp_path / "control")})
    torch.load(tmp_path / "control.ckpt", weights_only=False)
    assert (tmp_path / "control").exists()

    path = lightning_file(tmp_path / "evil.ckpt", state, {"x": _Payload(tmp_path / "marker")})
    with pytest.raises(OfficialCheckpointError, match=r"io\.open.*could run code"):
        import_official(FIX / "vae.ckpt", path, tmp_path / "run", HEADS)
    assert run_cli("import-official", "--vae", FIX / "vae.ckpt", "--ddpm", path, "--run",
                   tmp_path / "run", "--num-heads", HEADS) == 2
    assert not (tmp_path / "marker").exists() and not (tmp_path / "run").exists()


@pytest.fixture
def fake_lightning(monkeypatch, tmp_path):
    """A stand-in `pytorch_lightning` package whose classes would write a marker if called,
    for writing files that name them as real checkpoints do; gone again before loading."""
    marker = tmp_path / "lightning-ran"

    class ModelCheckpoint:
        def __init__(self, *args):
            marker.write_text("constructed")

        def __reduce__(self):  # unpickling calls the class: it must never be the real one
            return (ModelCheckpoint, ("called at load time",))

    names = ["pytorch_lightning", "pytorch_lightning.callbacks",
             "pytorch_lightning.callbacks.model_checkpoint"]
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = names[-1], "ModelCheckpoint"
    sys.modules[names[-1]].ModelCheckpoint = ModelCheckpoint
    yield ModelCheckpoint, marker


def test_lightning_classes_in_a_real_checkpoint_load_as_inert_stand_ins(tmp_path,
                                                                       fake_lightning):
    cls, marker = fake_lightning
    callbacks = {cls: {"best_model_path": "/x.ckpt"}, "instance": cls.__new__(cls)}
    path = lightning_file(tmp_path / "real-like.ckpt", _form1_state(), callbacks)
    for name in [n for n in sys.modules if n.startswith("pytorch_lightning")]:
        del sys.modules[name]  # the loader must not need (or import) Lightning
    data = read_lightning_checkpoint(path)
    key = next(k for k in data["callbacks"] if not isinstance(k, str))
    assert key.__name__ == "ModelCheckpoint" and key is not cls
    assert type(data["callbacks"]["instance"]).__name__ == "ModelCheckpoint"
    import_official(FIX / "vae.ckpt", path, tmp_path / "run", HEADS)
    assert not marker.exists() and (tmp_path / "run" / "refiner" / "model.safetensors").is_file()


def test_a_truncated_or_foreign_file_is_refused_in_one_line(tmp_path):
    data = (FIX / "ddpm_form1.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    for name in ("cut.ckpt", "text.ckpt"):
        with pytest.raises(OfficialCheckpointError, match="not a PyTorch checkpoint|truncated"):
            read_lightning_checkpoint(tmp_path / name)


# --------------------------------------------------------------------------------------------
# The command line, and every command on the imported run
# --------------------------------------------------------------------------------------------

def test_import_official_then_the_commands_work_on_the_run(tmp_path, capsys):
    from PIL import Image

    pics = tmp_path / "pics"  # the run's "training images": 12 flat colours, half of them red
    pics.mkdir()
    rows = ["file,Red"]
    for i in range(12):
        Image.new("RGB", (16, 16), (20 * i, 100 + 5 * i, 240 - 20 * i)).save(pics / f"{i:02d}.png")
        rows.append(f"{i:02d}.png,{1 if i >= 6 else -1}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    run = tmp_path / "run"
    assert run_cli("import-official", "--vae", FIX / "vae.ckpt", "--ddpm",
                   FIX / "ddpm_form1.ckpt", "--run", run, "--num-heads", HEADS,
                   "--dataset", "folder", "--data-dir", pics) == 0
    assert "form1 refiner (the EMA network)" in capsys.readouterr().out
    common = ["--run", run, "--device", "cpu"]
    fast = ["--steps", 2, "--batch-size", 4]
    commands = [
        ["sample", "--n", 3, "--steps", 3, "--sampler", "dpmpp_2m", "--spacing", "trailing",
         "--show-stages"],
        ["sample", "--n", 2, "--keep-eps", "--out", run / "official-ddim", *fast],
        ["sample-vae", "--n", 2],
        ["reconstruct", "--n", 2, *fast],  # the recorded training images
        ["reconstruct", "--input", pics, "--n", 2, "--no-refine", "--overwrite"],  # the same folder
        ["refine", "--input", pics, *fast],
        ["interpolate", "--frames", 3, *fast],
        ["fit-prior", "--components", 1],
        ["sample", "--n", 2, "--prior", "gmm", "--out", run / "gmm", *fast],
        ["attributes", "--labels", tmp_path / "labels.csv"],
        ["edit", "--attribute", "Red", "--n", 2, "--lambdas", "0,1", *fast],
    ]
    for command in commands:
        assert run_cli(command[0], *common, *command[1:]) == 0, command
    assert len(list((run / "samples" / "images").glob("*.png"))) == 3
    assert (run / "prior" / "gmm.safetensors").is_file()
    assert (run / "edit" / "Red.png").is_file()


def test_evaluate_scores_an_imported_run(imported, tmp_path):
    """evaluate's path (samples drawn from the run, a reference folder), with colour statistics
    as a stand-in feature extractor: no trained extractor fits 16x16 RGB images here."""
    from PIL import Image

    from diffusevae.scoring.evaluation import evaluate
    from diffusevae.scoring.features import Extractor
    from diffusevae.scoring.sources import run_source

    for i in range(8):
        Image.new("RGB", (16, 16), (30 * i, 100, 200 - 20 * i)).save(tmp_path / f"{i}.png")

    def colour_statistics(images):  # (B, H, W, C) uint8 -> 6 features, 3 "logits"
        x = torch.from_numpy(images).float().flatten(1, 2) / 255
        features = torch.cat([x.mean(1), x.std(1)], dim=1)
        return features, features[:, :3]

    extractor = Extractor("stub", "FID (colour statistics)", 6, "-", "-", colour_statistics)
    source = run_source(imported["openai-form2"], SampleConfig(n=8, steps=2, batch_size=4))
    result = evaluate(source, str(tmp_path), extractor, kid_subset_size=4, kid_subsets=2,
                      is_splits=1, progress=False)
    assert "form2-official" in json.dumps(result["protocol"])
    assert all(math.isfinite(result[k]) for k in ("fid", "kid", "is"))


def test_commands_that_read_the_training_images_say_how_to_name_them(tmp_path, capsys):
    run = tmp_path / "run"
    import_official(FIX / "vae.ckpt", FIX / "ddpm_form1.ckpt", run, num_heads=HEADS)
    assert run_cli("fit-prior", "--run", run, "--device", "cpu") == 2
    assert "import it again into a new run folder with `diffusevae import-official`, naming" in capsys.readouterr().err


def test_import_official_errors_are_one_line_with_exit_2(tmp_path, capsys):
    code = run_cli("import-official", "--vae", FIX / "vae.ckpt", "--ddpm",
                   FIX / "ddpm_form1.ckpt", "--run", tmp_path / "run")
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--num-heads" in err and len(err.splitlines()) == 1
