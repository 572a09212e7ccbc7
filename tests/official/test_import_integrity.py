"""import-official checks both files whole before it writes, and writes atomically: a corrupt
file (a failed CRC, integer or non-finite weights, a nan hyper-parameter, an impossible noise
schedule) is refused in one line naming the file and why, and a failure mid-write (a full
disk) leaves no run behind, so that the retry succeeds."""

from __future__ import annotations

import errno
import math
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from diffusevae.errors import OfficialCheckpointError
from diffusevae.official import importer
from diffusevae.official.importer import import_official, read_lightning_checkpoint

FIX = Path(__file__).parents[1] / "fixtures" / "official"
VAE, DDPM = FIX / "vae.ckpt", FIX / "ddpm_form1.ckpt"
HEADS = 2  # the tiny models' head count (fixtures/official/reference.json)


def _resaved(path: Path, out: Path, change) -> Path:
    """``path``'s checkpoint with ``change(checkpoint)`` applied, saved again (valid CRCs)."""
    ckpt = torch.load(path, weights_only=False, map_location="cpu")
    change(ckpt)
    torch.save(ckpt, out)
    return out


def _flipped(path: Path, out: Path) -> Path:
    """``path`` with one byte flipped inside its largest stored tensor: the zip still opens,
    the tensor's CRC fails."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[start + info.file_size // 2] ^= 0xFF
    out.write_bytes(bytes(data))
    return out


def _first_weight(state: dict) -> str:
    return next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)


def _nan_weight(ckpt: dict) -> None:
    ckpt["state_dict"][_first_weight(ckpt["state_dict"])].view(-1)[0] = math.nan


def _int_weight(ckpt: dict) -> None:
    key = _first_weight(ckpt["state_dict"])
    ckpt["state_dict"][key] = ckpt["state_dict"][key].round().to(torch.int64)


def _nan_alpha(ckpt: dict) -> None:
    ckpt["hyper_parameters"]["alpha"] = math.nan


def _negative_betas(ckpt: dict) -> None:
    for key, value in ckpt["state_dict"].items():
        if key.endswith("network.betas"):
            ckpt["state_dict"][key] = torch.linspace(-0.01, 0.02, len(value),
                                                     dtype=value.dtype)


CASES = {  # name: (which file, how it is broken, what the message says)
    "vae-crc": ("vae", _flipped, "fails its CRC check"),
    "ddpm-crc": ("ddpm", _flipped, "fails its CRC check"),
    "vae-nan": ("vae", lambda p, o: _resaved(p, o, _nan_weight), "holds nan or inf"),
    "vae-int": ("vae", lambda p, o: _resaved(p, o, _int_weight), "holds int64"),
    "vae-nan-alpha": ("vae", lambda p, o: _resaved(p, o, _nan_alpha), "alpha (the KL weight)"),
    "ddpm-betas": ("ddpm", lambda p, o: _resaved(p, o, _negative_betas), "not all in (0, 1)"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_corrupt_file_is_refused_naming_it_and_nothing_is_written(case, tmp_path, capsys):
    which, corrupt, says = CASES[case]
    vae, ddpm = VAE, DDPM
    broken = corrupt(VAE if which == "vae" else DDPM, tmp_path / f"{which}-broken.ckpt")
    vae, ddpm = (broken, ddpm) if which == "vae" else (vae, broken)
    run = tmp_path / "run"
    with pytest.raises(OfficialCheckpointError) as err:
        import_official(vae, ddpm, run, num_heads=HEADS)
    assert says in str(err.value) and str(broken) in str(err.value), str(err.value)
    assert "is not the VAE of" not in str(err.value)  # a corrupt VAE is called corrupt
    assert not run.exists()
    code = run_cli("import-official", "--vae", vae, "--ddpm", ddpm, "--run", run,
                   "--num-heads", HEADS)
    out = capsys.readouterr().err.strip()
    assert code == 2 and out.startswith("error: ") and says in out and len(out.splitlines()) == 1
    assert not run.exists()


def test_the_intact_files_still_import(tmp_path):
    summary = import_official(VAE, DDPM, tmp_path / "run", num_heads=HEADS)
    assert summary["form"] == "form1" and (tmp_path / "run" / "refiner").is_dir()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["refiner", "vae"]


def test_the_crc_check_reads_every_part_before_loading(tmp_path):
    broken = _flipped(VAE, tmp_path / "v.ckpt")
    with pytest.raises(OfficialCheckpointError, match="fails its CRC check"):
        read_lightning_checkpoint(broken)
    read_lightning_checkpoint(VAE)  # the intact file passes


@pytest.mark.parametrize("existing", [False, True])
def test_a_full_disk_mid_import_leaves_nothing_and_the_retry_succeeds(existing, tmp_path,
                                                                       monkeypatch, capsys):
    """The refiner's folder fails to write after the VAE's was written: neither is left, nor
    the partial folder, nor the run folder where the import made it (a folder that was there
    stays, with the user's file in it)."""
    run = tmp_path / "run"
    if existing:
        run.mkdir()
        (run / "notes.txt").write_text("mine")
    real, calls = importer.save_model_folder, []

    def full_on_the_refiner(folder, *args, **kwargs):
        calls.append(Path(folder).name)
        if Path(folder).name == "refiner":
            raise OSError(errno.ENOSPC, "No space left on device", str(folder))
        return real(folder, *args, **kwargs)

    monkeypatch.setattr(importer, "save_model_folder", full_on_the_refiner)
    code = run_cli("import-official", "--vae", VAE, "--ddpm", DDPM, "--run", run,
                   "--num-heads", HEADS)
    err = capsys.readouterr().err.strip()
    assert calls == ["vae", "refiner"] and code == 1 and "disk is full" in err
    assert len(err.splitlines()) == 1
    if existing:
        assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]
    else:
        assert not run.exists()
    monkeypatch.setattr(importer, "save_model_folder", real)
    assert run_cli("import-official", "--vae", VAE, "--ddpm", DDPM, "--run", run,
                   "--num-heads", HEADS) == 0
    assert {"vae", "refiner"} <= {p.name for p in run.iterdir()}
    assert not (run / importer.IMPORT_PARTIAL).exists()


def test_a_killed_imports_partial_folder_is_replaced(tmp_path):
    run = tmp_path / "run"
    (run / importer.IMPORT_PARTIAL / "vae").mkdir(parents=True)  # what a kill leaves
    (run / importer.IMPORT_PARTIAL / "vae" / "model.safetensors").write_bytes(b"half")
    import_official(VAE, DDPM, run, num_heads=HEADS)
    assert sorted(p.name for p in run.iterdir()) == ["refiner", "vae"]
