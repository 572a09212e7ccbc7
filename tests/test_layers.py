"""The wings of the package, bottom to top, and that a module imports only from its own wing or
the wings below it:

- the base (config, filenames, names, limits, errors, rng, distributed, version): settings,
  the names of the files we write, bounds, randomness and the version;
- io (files), then presets (which reads config files through io);
- core (the mathematics and the networks), official (the published checkpoints), model (a
  trained model and `DiffuseVAE`), train, scoring, tasks, app and cli.

Read from the source (every import, at the top or inside a function), so that an import that
climbs a wing fails here rather than in a newcomer's head.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import diffusevae

PACKAGE = Path(diffusevae.__file__).parent
LAYERS = [{"config", "filenames", "names", "limits", "errors", "rng", "distributed", "version"},
          {"io"}, {"presets"},
          {"core"}, {"official"}, {"model"}, {"train"}, {"scoring"}, {"tasks"}, {"app"},
          {"cli"}, {"__main__"}]
FACE = {"__init__"}  # the package's face, which imports every wing: no module imports it


def wing_of(module: tuple[str, ...]) -> str:
    """The wing of a module path inside the package: its folder, or its own name at the top."""
    return module[0]


def imports_in(source: str, where: tuple[str, ...]) -> set[str]:
    """The wings that `source`, the module at `where` (its package path), imports from."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(where[:len(where) - node.level])
            if node.module:
                found.add(wing_of(tuple(base + node.module.split("."))))
            else:
                found |= {wing_of(tuple(base + [a.name])) if base else a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("diffusevae."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names
                      if a.name.startswith("diffusevae.")}
    return found


def modules() -> list[tuple[str, ...]]:
    """Every module of the package as its path, e.g. ("core", "unet") or ("config",)."""
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        out.append(parts)
    return out


def layer(wing: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if wing in names)


@pytest.mark.parametrize("module", [m for m in modules() if m[-1] != "__init__" or len(m) > 1],
                         ids=lambda m: "/".join(m))
def test_a_module_imports_only_its_own_wing_and_those_below(module):
    source = (PACKAGE.joinpath(*module[:-1], module[-1] + ".py")).read_text()
    mine = layer(wing_of(module))
    above = {w for w in imports_in(source, module) - FACE if layer(w) > mine}
    assert not above, f"{'/'.join(module)} imports from the higher wing(s) {sorted(above)}"


def test_every_wing_has_a_place_in_the_order():
    wings = {wing_of(m) for m in modules()} - FACE
    placed = set().union(*LAYERS)
    assert wings <= placed, f"wings without a layer: {sorted(wings - placed)}"


def test_no_two_files_share_a_stem():
    stems = [m[-1] for m in modules() if m[-1] != "__init__"]
    assert len(stems) == len(set(stems)), sorted({s for s in stems if stems.count(s) > 1})


def test_the_reader_sees_every_kind_of_import():
    source = ("import torch\nfrom ..config import Config\n"
              "def f():\n    from ..model.pipeline import DiffuseVAE\n"
              "from diffusevae.train.stages import train_vae\nfrom .. import __version__, rng\n"
              "from .unet import UNet\nimport diffusevae.cli\n")
    assert imports_in(source, ("core", "vae")) == {"config", "model", "train", "__version__",
                                                    "rng", "core", "cli"}


def test_an_import_that_climbs_a_wing_is_caught():
    # the check itself must be able to fail: io importing the pipeline climbs three wings
    found = imports_in("from ..model.pipeline import DiffuseVAE\n", ("io", "images"))
    assert {w for w in found if layer(w) > layer("io")} == {"model"}
