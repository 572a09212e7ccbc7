"""RunFolder: the layout of a run, what it holds, its recorded configs and loading."""

import os

import pytest
import torch

from diffusevae.config import DiffusionConfig, UNetConfig, VAEConfig
from diffusevae.errors import CheckpointError, RunFolderError
from diffusevae.filenames import OUTPUT_DIRS
from diffusevae.model.run_folder import RunFolder, load_refiner, save_refiner
from diffusevae.core.unet import UNet
from diffusevae.core.vae import VAE


def test_the_layout_is_named_in_one_place(tmp_path):
    run = RunFolder(tmp_path / "r")
    assert (run.vae_dir, run.refiner_dir) == (tmp_path / "r/vae", tmp_path / "r/refiner")
    assert (run.prior_dir, run.attributes_dir, run.classifier_dir) == (
        tmp_path / "r/prior", tmp_path / "r/attributes", tmp_path / "r/classifier")
    assert run.train_config_path("refiner") == tmp_path / "r/refiner/train_config.json"
    assert os.fspath(run) == str(tmp_path / "r") and RunFolder(run).root == run.root
    with pytest.raises(ValueError, match="vae, refiner"):
        run.stage_dir("prior")
    # outputs go to --out when given, else to the command's folder in the run
    assert run.output_dir("sample") == tmp_path / "r/samples"
    assert run.output_dir("reconstruct", tmp_path / "elsewhere") == tmp_path / "elsewhere"
    assert {run.output_dir(c).parent for c in OUTPUT_DIRS} == {run.root}
    with pytest.raises(ValueError, match="no default output folder"):
        run.output_dir("train-vae")


def test_an_empty_run_says_what_to_train(tmp_path):
    run = RunFolder(tmp_path)
    assert not run.has_vae() and not run.has_refiner() and not run.has_classifier()
    assert run.data_config() is None
    with pytest.raises(RunFolderError, match="holds no trained VAE.*diffusevae train-vae"):
        run.load_vae()
    with pytest.raises(CheckpointError, match="holds no trained refiner.*train-refiner"):
        run.load_refiner()
    with pytest.raises(CheckpointError, match="train-refiner"):
        run.load_models()
    with pytest.raises(RunFolderError, match="train_config.json is missing.*train-vae"):
        run.train_config("vae")


def test_a_trained_run_holds_both_stages_and_their_configs(trained_run):
    run = RunFolder(trained_run)
    assert run.has_vae() and run.has_refiner() and not run.has_classifier()
    assert run.train_config("vae").data == run.data_config()
    assert run.data_config().dataset == "digits"
    vae, unet, diffusion = run.load_models()
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    assert diffusion.form == "form2" and unet.config.cond
    digest = run.weights_digest(use_ema=True, with_vae=True, with_prior=False)
    assert set(digest) == {f"{stage}/{run.weights_file(stage).name}"
                           for stage in ("vae", "refiner")}
    assert all(len(h) == 64 for h in digest.values())  # from the manifests


def test_the_weights_read_are_the_ema_ones_when_present(tmp_path):
    torch.manual_seed(0)
    vae = VAE(VAEConfig())
    vae.save_pretrained(tmp_path / "vae", {k: v + 1 for k, v in vae.state_dict().items()})
    run = RunFolder(tmp_path)
    assert run.weights_file("vae").name == "ema.safetensors"
    assert run.weights_file("vae", use_ema=False).name == "model.safetensors"
    (tmp_path / "prior").mkdir()
    (tmp_path / "prior" / "prior.json").write_text("{}")
    digest = run.weights_digest(use_ema=False, with_vae=True, with_prior=True)
    assert set(digest) == {"vae/model.safetensors", "refiner/model.safetensors",
                           "prior/prior.json"}
    assert digest["refiner/model.safetensors"] is None  # no refiner yet: nothing to record
    name, tensor = next(iter(vae.state_dict().items()))
    assert torch.equal(run.load_vae(use_ema=False).state_dict()[name], tensor)
    assert torch.equal(run.load_vae().state_dict()[name], tensor + 1)


def test_a_refiner_folder_round_trips(tmp_path):
    torch.manual_seed(0)
    unet = UNet(UNetConfig(base_channels=16))
    save_refiner(tmp_path / "refiner", unet, None, DiffusionConfig(form="form1", p_uncond=0.1))
    loaded, diffusion = load_refiner(tmp_path / "refiner")
    assert (diffusion.form, diffusion.p_uncond) == ("form1", 0.1)
    for name, tensor in unet.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)
    assert RunFolder(tmp_path).has_refiner() and not RunFolder(tmp_path).has_vae()


def test_stages_from_different_presets_are_refused_at_load(tmp_path):
    torch.manual_seed(0)
    VAE(VAEConfig(channels=3)).save_pretrained(tmp_path / "vae")  # RGB VAE, grayscale refiner
    save_refiner(tmp_path / "refiner", UNet(UNetConfig(base_channels=16)), None,
                 DiffusionConfig())
    with pytest.raises(CheckpointError, match=r"vae makes 16x16x3 images but .*refiner refines "
                                              r"16x16x1 images.*different presets"):
        RunFolder(tmp_path).load_models()


def test_an_unconditional_refiner_needs_no_vae(tmp_path):
    save_refiner(tmp_path / "refiner", UNet(UNetConfig(base_channels=16, cond=False)), None,
                 DiffusionConfig(form="uncond"))
    vae, unet, diffusion = RunFolder(tmp_path).load_models()
    assert vae is None and diffusion.form == "uncond"
