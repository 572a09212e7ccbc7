"""The explorer (app/explorer.py, `diffusevae explore`): the callbacks as plain functions, the server
driven over HTTP on a free loopback port, and the page in a real headless Chromium.

Run as a script, this file's browser helpers write the README picture from any run:
    python tests/app/test_explorer.py --run models/fashion-mnist --out docs/explorer.png
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusevae.app import explorer as app
from diffusevae.app import page
from diffusevae.app.explorer import Direction, Explorer, Latent, Settings, read_upload
from diffusevae.config import DiffusionConfig
from diffusevae.errors import ConfigError, DataError
from diffusevae.tasks.control import compute_directions, principal_directions
from diffusevae.model.pipeline import DiffuseVAE
from diffusevae.model.sampling_defaults import SamplingDefaults
from diffusevae.core.prior import GaussianMixture
from diffusevae.rng import sample_generators

try:  # conftest is on the path under pytest, not when this file runs as a script
    from conftest import bomb_png, png_bytes, run_cli
except ImportError:
    bomb_png = png_bytes = run_cli = None

# Gradio's queue calls pandas in ways pandas 3 deprecates: not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"  # Debian's packages
TIMEOUT = 120  # seconds the browser waits for the page (a loaded 2-core machine is slow)
MAX_IMAGES = 500  # training images encoded for the principal directions: enough, and quick


def _need(what: str, ok: bool) -> None:
    """Skip with a message where a browser-test dependency is missing; on CI, fail."""
    if not ok:
        message = f"{what} is not installed (.ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the explorer's browser and server tests: {message}")
        pytest.skip(message)


@pytest.fixture(scope="module")
def run_with_attributes(trained_run, tmp_path_factory) -> Path:
    """The trained run with a direction per digit class (RUN/attributes/)."""
    run = tmp_path_factory.mktemp("run") / "run"
    shutil.copytree(trained_run, run)
    compute_directions(run, max_images=300)
    return run


@pytest.fixture(scope="module")
def explorer(run_with_attributes, tmp_path_factory) -> Explorer:
    return Explorer.from_run(run_with_attributes, tmp_path_factory.mktemp("explore"),
                             max_images=MAX_IMAGES)


# --------------------------------------------------------------------------------------------
# The callbacks as plain functions
# --------------------------------------------------------------------------------------------

def test_principal_directions_recover_the_axes_of_known_data():
    g = torch.Generator().manual_seed(0)
    axes = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))[0].T  # rows
    scales = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.1], dtype=torch.float64)
    z = (torch.randn(20_000, 6, generator=g, dtype=torch.float64) * scales) @ axes + 7.0
    mean, vectors, std = principal_directions(z.float(), k=3)
    assert vectors.shape == (3, 6) and std.shape == (3,)
    assert torch.allclose(mean, torch.full((6,), 7.0), atol=0.1)
    assert torch.allclose(std, scales[:3].float(), rtol=0.03)
    assert torch.allclose(vectors @ vectors.T, torch.eye(3), atol=1e-5)
    cos = (vectors.double() * axes[:3]).sum(1).abs()
    assert (cos > 0.999).all()
    top = vectors.abs().argmax(1)
    assert (vectors.gather(1, top[:, None]) > 0).all()  # the sign convention
    with pytest.raises(ValueError, match="N >= 2"):
        principal_directions(z[:1].float())


def test_uploads_are_checked_before_and_while_decoding():
    gray = (np.arange(40 * 30) % 255).astype(np.uint8).reshape(40, 30)
    x = read_upload(png_bytes(gray), 16, 1)
    assert x.shape == (1, 16, 16) and -1 <= float(x.min()) <= float(x.max()) <= 1
    with pytest.raises(DataError, match="no image was uploaded"):
        read_upload(b"", 16, 1)
    with pytest.raises(DataError, match="not an image"):
        read_upload(b"#!/bin/sh\necho hello\n", 16, 1)
    with pytest.raises(DataError, match="up to 16 MiB"):
        read_upload(b"\0" * (app.MAX_UPLOAD_BYTES + 1), 16, 1)
    gif = io.BytesIO()
    Image.fromarray(gray).save(gif, format="GIF")
    with pytest.raises(DataError, match="GIF image"):
        read_upload(gif.getvalue(), 16, 1)
    with pytest.raises(DataError, match="5000x5000 pixels, more than .* decodes"):
        read_upload(bomb_png(5000, 5000), 16, 1)  # refused from its header
    with pytest.raises(DataError, match="claims 10,000,000,000 pixels.*decompression bomb"):
        read_upload(bomb_png(100_000, 100_000), 16, 1)
    colour = np.zeros((20, 20, 3), np.uint8)
    colour[..., 0] = 200
    with pytest.raises(DataError, match="colour .* convert"):  # as `refine` refuses it
        read_upload(png_bytes(colour), 16, 1)
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_upload(png_bytes(gray)[:60], 16, 1)


def test_settings_are_checked():
    assert Settings(steps=10.0).sample(3).steps == 10  # sliders give floats
    for bad in (Settings(steps=0), Settings(steps=101), Settings(prior="uniform"),
                Settings(sampler="euler"), Settings(temperature=-1)):
        with pytest.raises(ConfigError):
            bad.sample(0)
    with pytest.raises(ConfigError, match="seed"):
        Settings().sample(1.5)


def test_the_prior_of_z_starts_at_the_runs_sampling_default(explorer):
    """The page starts at the prior the run's sampling defaults name (the shipped model's: its
    Ex-PDE prior, which it samples best with); gmm is offered only when a prior is fitted."""
    _need("gradio (the app extra)", _has_module("gradio"))

    def prior_radio(ex: Explorer):
        radios = [c for c in page.build_app(ex).blocks.values()
                  if getattr(c, "label", None) == "prior of z"]
        assert len(radios) == 1
        return radios[0]

    assert explorer.pipe.prior is None and prior_radio(explorer).value == "normal"
    mixture = GaussianMixture(torch.ones(1), torch.zeros(1, explorer.pipe.vae.config.z_dim),
                              torch.eye(explorer.pipe.vae.config.z_dim)[None])
    for defaults, value in ((SamplingDefaults(), "normal"),
                            (SamplingDefaults(prior="gmm"), "gmm")):
        fitted = Explorer(DiffuseVAE(explorer.pipe.vae, explorer.pipe.unet,
                                     explorer.pipe.diffusion, mixture, defaults),
                          explorer.directions)
        radio = prior_radio(fitted)
        assert radio.value == value and [c[0] for c in radio.choices] == ["normal", "gmm"]


def test_the_server_leaves_one_core_to_the_web_on_a_cpu(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert page.serving_threads(torch.device("cpu")) == 1
    assert page.serving_threads(torch.device("cpu"), threads=2) == 2  # asked for: kept
    assert page.serving_threads(torch.device("cuda")) == 2  # the GPU does the work
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert page.serving_threads(torch.device("cpu")) == 1  # never zero


def test_directions_are_cached_in_the_output_folder_not_the_run(explorer, run_with_attributes,
                                                                   tmp_path, monkeypatch):
    run = run_with_attributes
    names = [d.name for d in explorer.directions]
    assert names == [f"PC {i}" for i in range(1, 9)] + [str(i) for i in range(10)]  # digits
    assert (explorer.out_dir / app.CACHE_FILE).is_file()
    published = tmp_path / "published"  # a shipped model: read only, outputs go elsewhere
    shutil.copytree(run, published)
    (published / "MODEL.md").write_text("a published model\n")
    files = sorted((p, p.stat().st_mtime_ns) for p in published.rglob("*"))
    monkeypatch.chdir(tmp_path)
    fresh = Explorer.from_run(published, max_images=MAX_IMAGES)  # again, under this folder
    assert fresh.out_dir == Path("diffusevae-outputs/published/explore")
    assert (fresh.out_dir / app.CACHE_FILE).is_file()
    assert sorted((p, p.stat().st_mtime_ns) for p in published.rglob("*")) == files
    assert all(torch.allclose(a.vector, b.vector) for a, b in zip(fresh.directions,
                                                                  explorer.directions))
    monkeypatch.setattr(app, "encode_dataset", lambda *a, **k: pytest.fail("re-encoded"))
    again = app.latent_directions(run, explorer.out_dir, explorer.pipe, MAX_IMAGES)
    assert all(torch.equal(a.vector, b.vector) for a, b in zip(again, explorer.directions))


def test_a_slider_moves_z_and_holds_the_noise_fixed(explorer):
    pipe, s = explorer.pipe, Settings(steps=4)
    latent = explorer.draw(s, seed=5)
    reference = pipe.generate_batch(s.sample(5), [0])  # sample 0 of seed 5, drawn as `sample`
    assert torch.equal(latent.z, reference.z[0].cpu())
    values = [0.0] * len(explorer.directions)
    values[0] = 1.5
    z = explorer.moved(latent, values)
    assert torch.allclose(z, latent.z + 1.5 * explorer.directions[0].vector)
    x_hat, refined = explorer.move(latent, s, values)
    expected = pipe.refine(pipe.decode(z[None]), z[None], sample_generators(5, [0]),
                           s.sample(5))  # the same noise as the unmoved sample
    assert np.array_equal(refined, app.view(expected))
    assert not np.array_equal(x_hat, explorer.move(latent, s, [0.0] * len(values))[0])
    for bad in ([0.0], values[:-1] + [float("nan")], values[:-1] + [9.0]):
        with pytest.raises(ConfigError):
            explorer.move(latent, s, bad)
    with pytest.raises(ConfigError, match="draw a sample"):
        explorer.move(None, s, values)


def test_generate_shows_pairs_and_the_steps_of_one_sample(explorer):
    pairs, strip = explorer.generate(Settings(steps=3), seed=0, n=3)
    assert pairs.ndim == 3 and pairs.shape[2] == 3 and pairs.dtype == np.uint8
    assert strip.shape[1] > 2.5 * strip.shape[0]  # three steps side by side
    with pytest.raises(ConfigError, match="1..16"):
        explorer.generate(Settings(), seed=0, n=17)


def test_a_real_image_is_encoded_edited_and_exact_mode_inverts_it(explorer):
    s = Settings(steps=10)
    fresh = explorer.open_test_image(3, s, seed=0)
    assert fresh.y_T is None and fresh.x.shape == explorer.pipe.image_shape
    zeros = [0.0] * len(explorer.directions)
    row = explorer.edit(fresh, s, zeros)
    assert row.shape[1] > 2.5 * row.shape[0]  # input | x_hat | refined
    exact = explorer.open_test_image(3, s, seed=0, exact=True)
    assert exact.y_T is not None and torch.equal(exact.z, fresh.z)
    x = fresh.x[None]
    err = {name: float((explorer.refine(lat.z, s, 0, lat.y_T).cpu() - x).abs().mean())
           for name, lat in (("fresh", fresh), ("exact", exact))}
    assert err["exact"] < 0.5 * err["fresh"], err  # the inverted x_T gives the input back
    with pytest.raises(ConfigError, match="open an image"):
        explorer.edit(Latent(fresh.z, 0), s, zeros)
    with pytest.raises(ConfigError, match="test image number"):
        explorer.open_test_image(10**6, s, seed=0)


def test_interpolate_writes_a_gif_in_the_output_folder(explorer):
    path, strip = explorer.interpolate(Settings(steps=3), frames=4, mode="slerp")
    assert Path(path).parent == explorer.out_dir
    with Image.open(path) as gif:
        assert gif.n_frames == 6  # there and back: 4 + 2
    x = explorer.test_image(0)
    path, _ = explorer.interpolate(Settings(steps=3), 3, "lerp", x_a=x, x_b=explorer.test_image(1))
    with pytest.raises(ConfigError, match="two images"):
        explorer.interpolate(Settings(steps=3), 3, "lerp", x_a=x)
    with pytest.raises(ConfigError, match="frames"):
        explorer.interpolate(Settings(), 99, "lerp")


def test_the_explorer_needs_a_vae(explorer):
    pipe = explorer.pipe
    uncond = DiffuseVAE(None, pipe.unet, DiffusionConfig(form="uncond"))
    with pytest.raises(ConfigError, match="no VAE"):
        Explorer(uncond, [])


def test_without_gradio_the_page_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)
    with pytest.raises(ConfigError, match=r"diffusevae\[app\]"):
        page._gradio()


def test_cli_warns_when_not_on_loopback(explorer, run_with_attributes, tmp_path, monkeypatch,
                                        capsys):
    from diffusevae.cli import explore_command as explore

    served = {}
    monkeypatch.setattr(explore, "serve", lambda ex, host, port, threads: served.update(
        host=host, port=port, out=ex.out_dir, threads=threads))
    out = explorer.out_dir  # its slider directions are cached there already
    run = run_with_attributes
    assert run_cli("explore", "--run", run, "--host", "0.0.0.0", "--port", 7999,
                   "--out", out, "--device", "cpu", "--max-images", MAX_IMAGES) == 0
    err = capsys.readouterr().err
    assert "warning: serving on 0.0.0.0" in err and len(err.strip().splitlines()) == 1
    assert served == {"host": "0.0.0.0", "port": 7999, "out": out, "threads": None}
    assert run_cli("explore", "--run", run, "--out", out, "--max-images", MAX_IMAGES,
                   "--threads", 3) == 0
    assert served["host"] == "127.0.0.1" and "warning" not in capsys.readouterr().err
    assert served["threads"] == 3
    assert run_cli("explore", "--run", tmp_path / "none") == 2  # no refiner: one line


# --------------------------------------------------------------------------------------------
# The server, on a free port of the loopback address, driven over HTTP
# --------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(explorer):
    """The page of `explorer`, its first slider replaced by z's first axis: the VAE of a run
    trained for seconds has all but collapsed (its principal directions' standard deviations
    are ~0.02), so moving along them changes no pixel, while a unit step along an axis of z
    visibly moves x_hat. How the directions are computed is tested above."""
    _need("gradio (the app extra)", _has_module("gradio"))
    axis = torch.zeros_like(explorer.directions[0].vector)
    axis[0] = 1.0
    served = Explorer(explorer.pipe, [Direction("z[0]", axis, 3.0), *explorer.directions[1:]],
                      explorer.test_images, explorer.out_dir)
    demo = page.serve(served, "127.0.0.1", free_port(), block=False,
                     threads=torch.get_num_threads())  # the suite's other tests keep theirs
    yield demo.local_url
    demo.close()


def _has_module(name: str) -> bool:
    try:
        __import__(name)
        return True
    except ImportError:
        return False


def test_the_server_answers_moves_and_survives_a_bad_request(server, explorer):
    from gradio_client import Client, handle_file

    client = Client(server, verbose=False)
    settings = (10, "ddim", 0.0, 1.0, "normal")
    n = len(explorer.directions)
    first = client.predict(*settings, 0, api_name="/draw")
    values = [0.0] * n
    values[0] = 2.0
    moved = client.predict(*settings, *values, api_name="/move")
    before, after = (np.asarray(Image.open(p)) for p in (first[0], moved[0]))  # x_hat
    assert before.shape == after.shape and not np.array_equal(before, after)
    bad = Path(moved[1]).with_name("bad.png")
    bad.write_text("not an image")
    with pytest.raises(Exception, match=r"not an image .*reads \(PNG, JPEG, WebP or BMP\)"):
        client.predict(handle_file(str(bad)), *settings, 0, False, api_name="/open_upload")
    again = client.predict(*settings, *values, api_name="/move")  # still serving
    assert np.array_equal(np.asarray(Image.open(again[0])), after)


def test_the_server_takes_no_path_from_the_browser(server, explorer):
    import httpx

    assert server.startswith("http://127.0.0.1:")
    for path in ("/etc/passwd", str(explorer.out_dir / app.CACHE_FILE)):
        call = f"{server}gradio_api/call/open_upload"
        data = [{"path": path, "meta": {"_type": "gradio.FileData"}}, 10, "ddim", 0.0, 1.0,
                "normal", 0, False]
        event = httpx.post(call, json={"data": data}, timeout=30).json()["event_id"]
        answer = httpx.get(f"{call}/{event}", timeout=60).text
        assert "event: error" in answer and "root:" not in answer


# --------------------------------------------------------------------------------------------
# The page in a real browser (headless Chromium); the same helpers write docs/explorer.png
# --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def browser(width: int = 1400, height: int = 1000):
    """A headless Chromium driven by chromedriver (Debian's `chromium`, `chromium-driver`)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver, condition, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, TIMEOUT, poll_frequency=0.2).until(condition, message=what)


def shown_image(driver, elem_id: str) -> tuple[str, np.ndarray]:
    """The URL and the pixels, as the page shows them, of the loaded image in #elem_id."""
    from selenium.webdriver.common.by import By

    def loaded(d):
        for img in d.find_elements(By.CSS_SELECTOR, f"#{elem_id} img"):
            if d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0",
                                img):
                return img
        return None

    img = _wait(driver, loaded, f"no image shown in #{elem_id}")
    pixels = np.asarray(Image.open(io.BytesIO(img.screenshot_as_png)).convert("RGB"))
    return img.get_attribute("src"), pixels


def move_slider(driver, label: str, presses: int) -> None:
    """Move the slider called ``label`` by ``presses`` steps with the keyboard, as a user does."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    slider = driver.find_element(By.CSS_SELECTOR, f"input[aria-label='range slider for {label}']")
    slider.click()  # lands at the middle: 0
    for _ in range(abs(presses)):
        slider.send_keys(Keys.ARROW_RIGHT if presses > 0 else Keys.ARROW_LEFT)


def open_tab(driver, name: str) -> None:
    from selenium.webdriver.common.by import By

    tab = _wait(driver, lambda d: next((e for e in d.find_elements(By.CSS_SELECTOR,
                                                                   "button[role=tab]")
                                        if e.text.strip() == name and e.is_displayed()), None),
                f"no tab {name}")
    tab.click()


def moved_page(driver, url: str, label: str = "PC 1", presses: int = 6) -> tuple:
    """Load the page, wait for the Latent panel's x_hat, move a slider and wait for the new
    x_hat; the pixels before and after. (x_hat, not the refined image: the tests' refiner,
    trained for a few steps, paints most images one flat colour.)"""
    driver.get(url)
    src, before = shown_image(driver, "latent-xhat")
    move_slider(driver, label, presses)
    _wait(driver, lambda d: shown_image(d, "latent-xhat")[0] != src,
          "x_hat did not change after the slider moved")
    shown_image(driver, "latent-refined")  # the refined image is shown too
    return before, shown_image(driver, "latent-xhat")[1]


def screenshot_after_a_move(driver, url: str, path: str | Path, label: str = "PC 1") -> tuple:
    """The README picture: the Latent panel after a move of slider `label`; the x_hat pixels
    before and after the move."""
    before, after = moved_page(driver, url, label)
    time.sleep(0.5)  # the slider's handle settles
    driver.save_screenshot(str(path))
    return before, after


def test_the_page_in_a_real_browser(server, tmp_path):
    from selenium.webdriver.common.by import By

    _need("chromium and chromium-driver", Path(CHROMIUM).exists() and Path(CHROMEDRIVER)
          .exists())
    _need("selenium (the dev extra)", _has_module("selenium"))
    with browser() as driver:
        before, after = screenshot_after_a_move(driver, server, tmp_path / "explorer.png",
                                                "z[0]")
        assert before.shape == after.shape and (before != after).any()  # pixels differ
        with Image.open(tmp_path / "explorer.png") as shot:
            assert shot.width == 1400 and shot.height > 600
        open_tab(driver, "Real image")
        bad = tmp_path / "bad.png"
        bad.write_text("not an image")
        driver.find_element(By.CSS_SELECTOR, "#real-upload input[type=file]").send_keys(str(bad))
        _wait(driver, lambda d: d.find_elements(
            By.XPATH, "//*[contains(text(), 'is not an image diffusevae reads')]"),
            "the invalid upload showed no error in the page")


def main() -> None:
    """Write the README picture: serve a run on a free port, screenshot the page."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--run", required=True)
    parser.add_argument("--out", default="docs/explorer.png")
    parser.add_argument("--cache", default=None, help="the explorer's --out")
    args = parser.parse_args()
    demo = page.serve(Explorer.from_run(args.run, args.cache), "127.0.0.1", free_port(),
                     block=False)
    try:
        with browser() as driver:
            screenshot_after_a_move(driver, demo.local_url, args.out)
    finally:
        demo.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()


def test_an_address_that_cannot_be_served_is_refused_before_any_work(trained_run, capsys):
    """A host that names no address, one of another machine, or a port in use: one line,
    exit 2, before the run is loaded and before any URL is printed (it was three errors and a
    URL)."""
    import socket

    with pytest.raises(ConfigError, match="`host` 'a..b' is not an address"):
        page.check_address("a..b", 7860)
    with pytest.raises(ConfigError, match="not an address of this machine"):
        page.check_address("192.0.2.1", 7860)  # TEST-NET-1: never this machine's
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError, match=f"127.0.0.1:{port}: in use"):
            page.check_address("127.0.0.1", port)
        assert run_cli("explore", "--run", trained_run, "--port", port) == 2
        err = capsys.readouterr()
        assert err.err.startswith("error: cannot serve on 127.0.0.1") and "--port" in err.err
        assert len(err.err.splitlines()) == 1 and "http://" not in err.out
    page.check_address("127.0.0.1", port)  # free again: accepted
