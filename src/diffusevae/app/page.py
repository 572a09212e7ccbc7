"""The explorer's page: `build_app` lays `Explorer`'s callbacks out as a Gradio page (Latent,
Generate, Real image, Interpolate), and `serve` starts it. Gradio is imported here only, when a
page is built: the library and `Explorer` run without the `app` extra. Each control of a
sampling setting is made from its config field (`_control`), with the sliders' ranges of
`explorer.UI_RANGES`; an error in a callback becomes a message in the page, and the server goes
on serving.
"""

from __future__ import annotations

import errno
import os
import socket
import traceback
from typing import Callable

import torch

from ..config import SampleConfig, setting_of
from ..core.prior import PRIORS
from ..errors import ConfigError, DiffuseVAEError
from ..tasks.control import MODES
from .explorer import (ATTRIBUTE_LIMIT, MAX_FRAMES, MAX_IMAGES, MAX_UPLOAD_BYTES, PRINCIPAL_LIMIT,
                       UI_RANGES, Explorer, Settings, read_upload)


def _gradio():
    """The Gradio module, or an error saying how to install it."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local app reports nothing
    try:
        import gradio
    except ImportError:
        raise ConfigError("the explorer needs Gradio: pip install -c constraints.txt "
                          "'diffusevae[app]'") from None
    return gradio


def _guard(gr, fn: Callable) -> Callable:
    """``fn`` with any error turned into a message in the page; the server keeps serving."""
    def call(*args):
        try:
            return fn(*args)
        except (DiffuseVAEError, ValueError) as exc:  # the input: say what to change
            raise gr.Error(str(exc), print_exception=False) from None
        except Exception as exc:  # ours: the details go to the terminal
            traceback.print_exc()
            raise gr.Error(f"internal error ({type(exc).__name__}: {exc}); the terminal "
                           "running `diffusevae explore` shows the details",
                           print_exception=False) from None
    return call


def _settings_row(gr, explorer: Explorer) -> list:
    """The sampling settings every panel uses: steps, sampler, guidance, temperature, prior."""
    base = explorer.base  # each control starts at the run's sampling defaults
    with gr.Row():
        steps, sampler = _control(gr, "steps", base), _control(gr, "sampler", base)
        guidable = explorer.pipe.form.conditioned and explorer.pipe.diffusion.p_uncond > 0
        guidance = _control(gr, "guidance", base, interactive=guidable)
        temperature = _control(gr, "temperature", base)
        fitted = explorer.pipe.prior is not None
        prior = gr.Radio([p for p in PRIORS if p == "normal" or fitted],
                         value=explorer.pipe.defaults.prior, label="prior of z")
    return [steps, sampler, guidance, temperature, prior]


def _control(gr, name: str, base: SampleConfig, **kw):
    """The control of `SampleConfig` field ``name``, made from its setting: a menu of its
    choices, a slider over its UI range, or a number box over its range; at ``base``'s value."""
    setting, default = setting_of(SampleConfig, name), getattr(base, name)
    if setting.choices:
        return gr.Dropdown(list(setting.names()), value=default, label=name, info=setting.help,
                           **kw)
    if name in UI_RANGES:
        low, high, step = UI_RANGES[name]
        return gr.Slider(low, high, default, step=step, label=name, info=setting.help, **kw)
    return gr.Number(default, minimum=setting.least, maximum=setting.most, label=name,
                     info=setting.help, **kw)


def _sliders(gr, explorer: Explorer) -> list:
    """One slider per direction, at 0: a column of principal directions, one of attributes."""
    if not explorer.directions:
        gr.Markdown("This run has no slider directions: its training data could not be read "
                    "and it has no `attributes/` (see `diffusevae attributes`).")
    sliders = []
    for kind, title in ((PRINCIPAL_LIMIT, "**Principal directions** (standard deviations)"),
                        (ATTRIBUTE_LIMIT, "**Attributes** (λ: 1 = the whole gap)")):
        group = [d for d in explorer.directions if d.limit == kind]
        if group:
            with gr.Column(min_width=200):
                gr.Markdown(title)
                sliders += [gr.Slider(-d.limit, d.limit, 0.0, step=0.125,
                                      label=d.name) for d in group]
    return sliders


def _on_move(gr, sliders: list, fn: Callable, inputs: list, outputs: list, name: str) -> None:
    """Run ``fn`` as a user moves any slider (`.input`: not when `start` resets them); live:
    the page sends the last position once the previous answer is in, and skips the queue."""
    if sliders:
        gr.on([s.input for s in sliders], fn, inputs, outputs, api_name=name, queue=False,
              trigger_mode="always_last", show_progress="hidden")


def _generate_tab(gr, explorer: Explorer, settings: list) -> None:
    with gr.Row():
        seed = gr.Number(0, precision=0, minimum=0, label="seed")
        n = gr.Slider(1, MAX_IMAGES, 8, step=1, label="images")
        go = gr.Button("Generate", variant="primary")
    pairs = gr.Image(label="x̂ | refined, in pairs", format="png", interactive=False)
    strip = gr.Image(label="the first sample's predicted image at each step",
                     format="png", interactive=False)
    go.click(_guard(gr, lambda *a: explorer.generate(Settings(*a[:5]), a[5], a[6])),
             settings + [seed, n], [pairs, strip], api_name="generate")


def _latent_tab(gr, demo, explorer: Explorer, settings: list) -> None:
    state = gr.State(None)
    with gr.Row():
        with gr.Column(scale=2, min_width=300):
            with gr.Row():
                seed = gr.Number(0, precision=0, minimum=0, label="seed")
                draw = gr.Button("Draw z", variant="primary")
            with gr.Row():
                x_hat = gr.Image(label="x̂ = D(z)", format="png", interactive=False,
                                 elem_id="latent-xhat")
                refined = gr.Image(label="refined (fixed noise)", format="png",
                                   interactive=False, elem_id="latent-refined")
        sliders = _sliders(gr, explorer)
    zeros = [0.0] * len(sliders)

    def start(*a):
        latent = explorer.draw(Settings(*a[:5]), a[5])
        return (latent, *explorer.move(latent, Settings(*a[:5]), zeros), *zeros)

    outputs = [state, x_hat, refined, *sliders]
    draw.click(_guard(gr, start), settings + [seed], outputs, api_name="draw")
    demo.load(_guard(gr, start), settings + [seed], outputs, api_visibility="private")
    move = _guard(gr, lambda latent, *a: explorer.move(latent, Settings(*a[:5]), a[5:]))
    _on_move(gr, sliders, move, [state, *settings, *sliders], [x_hat, refined], "move")


def _real_tab(gr, explorer: Explorer, settings: list) -> None:
    state = gr.State(None)
    n_test = 0 if explorer.test_images is None else len(explorer.test_images)
    with gr.Row():
        upload = gr.File(label="upload an image (PNG, JPEG, WebP, BMP)", type="binary",
                         file_types=[".png", ".jpg", ".jpeg", ".webp", ".bmp"],
                         elem_id="real-upload")
        with gr.Column():
            index = gr.Number(0, precision=0, minimum=0, maximum=max(n_test - 1, 0),
                              label=f"test image (0..{n_test - 1})" if n_test else
                              "test image (the run's test data cannot be read here)",
                              interactive=n_test > 0)
            pick = gr.Button("Open test image", interactive=n_test > 0)
            seed = gr.Number(0, precision=0, minimum=0, label="seed of the refiner's noise")
            exact = gr.Checkbox(False, label="exact: invert x_T and hold it fixed (DDIM)")
    with gr.Row():
        row = gr.Image(label="input | x̂ | refined", format="png", interactive=False,
                       elem_id="real-row", min_width=300)
        sliders = _sliders(gr, explorer)
    zeros = [0.0] * len(sliders)

    def opener(open_image: Callable) -> Callable:  # encode, show at 0, reset the sliders
        def opened(source, *a):
            latent = open_image(source, Settings(*a[:5]), a[5], a[6])
            return (latent, explorer.edit(latent, Settings(*a[:5]), zeros), *zeros)
        return _guard(gr, opened)

    outputs = [state, row, *sliders]
    upload.upload(opener(explorer.open_upload), [upload, *settings, seed, exact], outputs,
                  api_name="open_upload", show_progress_on=row)
    pick.click(opener(explorer.open_test_image), [index, *settings, seed, exact], outputs,
               api_name="open_test_image", show_progress_on=row)
    edit = _guard(gr, lambda latent, *a: explorer.edit(latent, Settings(*a[:5]), a[5:]))
    _on_move(gr, sliders, edit, [state, *settings, *sliders], [row], "edit")


def _interpolate_tab(gr, explorer: Explorer, settings: list) -> None:
    with gr.Row():
        source = gr.Radio(["two seeds", "two test images", "two uploads"], value="two seeds",
                          label="endpoints")
        mode = gr.Radio(list(MODES), value="slerp", label="mode",
                        info="slerp / lerp: z moves, noise fixed; xt: the noise moves, z fixed")
        frames = gr.Slider(2, MAX_FRAMES, 8, step=1, label="frames")
    with gr.Row():
        a = [gr.Number(0, precision=0, minimum=0, label="seed a"),
             gr.Number(0, precision=0, minimum=0, label="test image a"),
             gr.File(label="image a", type="binary")]
        b = [gr.Number(1, precision=0, minimum=0, label="seed b"),
             gr.Number(1, precision=0, minimum=0, label="test image b"),
             gr.File(label="image b", type="binary")]
    go = gr.Button("Interpolate", variant="primary")
    with gr.Row():
        gif = gr.Image(label="GIF (there and back)", type="filepath", interactive=False)
        strip = gr.Image(label="frames", format="png", interactive=False)

    def run(*v):
        (src, m, f), (sa, ta, ua), (sb, tb, ub) = v[5:8], v[8:11], v[11:]
        c, size, _ = explorer.pipe.image_shape
        image = {"two seeds": lambda t, u: None, "two test images": lambda t, u:
                 explorer.test_image(t), "two uploads": lambda t, u: read_upload(u, size, c)}
        return explorer.interpolate(Settings(*v[:5]), f, m, sa, sb, image[src](ta, ua),
                                    image[src](tb, ub))

    go.click(_guard(gr, run), [*settings, source, mode, frames, *a, *b], [gif, strip],
             api_name="interpolate")


def build_app(explorer: Explorer):
    """The page: a settings row over four panels, each callback's errors shown in the page."""
    gr = _gradio()
    with gr.Blocks(title="DiffuseVAE explorer", analytics_enabled=False) as demo:
        gr.Markdown("## DiffuseVAE explorer\nz decides what the coarse image x̂ = D(z) shows; "
                    "the refiner adds the details. Move z and watch both.")
        settings = _settings_row(gr, explorer)
        with gr.Tabs():
            with gr.Tab("Latent"):
                _latent_tab(gr, demo, explorer, settings)
            with gr.Tab("Generate"):
                _generate_tab(gr, explorer, settings)
            with gr.Tab("Real image"):
                _real_tab(gr, explorer, settings)
            with gr.Tab("Interpolate"):
                _interpolate_tab(gr, explorer, settings)
    return demo


def serving_threads(device: torch.device, threads: int | None = None) -> int:
    """torch's CPU threads while serving: ``threads`` if given; else, for a model on the CPU,
    all cores but one, left to the web server. On 2 cores a slider move takes about half the
    time with one thread as with two, which fight the server's own thread for the cores
    (benchmarks/explorer_latency.py)."""
    if threads is not None:
        return threads
    current = torch.get_num_threads()
    return max(1, current - 1) if device.type == "cpu" else current


def check_address(host: str, port: int) -> None:
    """Refuse, before any work, an address the page could not be served on: a ``host`` that
    names no address, or one of another machine, and a ``port`` in use there."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise ConfigError(f"`host` {host!r} is not an address this machine knows "
                          f"({getattr(exc, 'strerror', None) or exc}); give one of its "
                          "addresses, e.g. 127.0.0.1 (this machine only) or 0.0.0.0 (every "
                          "network)") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            what = ("in use" if exc.errno == errno.EADDRINUSE else
                    "not an address of this machine" if exc.errno == errno.EADDRNOTAVAIL
                    else exc.strerror or str(exc))
            raise ConfigError(f"cannot serve on {host}:{port}: {what}; choose another "
                              "`port`, or a `host` of this machine") from None


def serve(explorer: Explorer, host: str = "127.0.0.1", port: int = 7860, block: bool = True,
          threads: int | None = None):
    """Start the page on http://host:port/ (no share link, uploads capped at
    MAX_UPLOAD_BYTES); with ``block`` serve until Ctrl-C, else return the running app (its
    ``close()`` stops it).

    ``threads``: torch's CPU threads for the model [`serving_threads`]."""
    check_address(host, port)
    torch.set_num_threads(serving_threads(explorer.pipe.device, threads))
    demo = build_app(explorer)
    demo.queue(default_concurrency_limit=1)  # one model: requests take turns
    explorer.out_dir.mkdir(parents=True, exist_ok=True)
    demo.launch(server_name=host, server_port=port, share=False, inbrowser=False,
                prevent_thread_lock=not block, max_file_size=MAX_UPLOAD_BYTES,
                allowed_paths=[str(explorer.out_dir.resolve())], ssr_mode=False,
                mcp_server=False, pwa=False, quiet=True)
    return demo
