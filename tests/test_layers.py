"""The layers of the package, bottom to top: the foundation (config, storage, rng, names,
errors, checkpoint), the maths and the networks, the run folder and what uses it, the command
line. A module imports only from the layers below it.

Read from the source (every import, at the top or inside a function), so that an import that
climbs a layer fails here rather than in a newcomer's head.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import diffusevae

PACKAGE = Path(diffusevae.__file__).parent

# Layer 1: no project imports beyond each other. `checkpoint` is the storage of models (it
# builds on `storage` and `config`), so the networks may save and load themselves.
FOUNDATION = {"config", "storage", "rng", "errors", "names", "checkpoint", "limits"}
# Layer 2: the maths and the networks.
MATHS = {"diffusion", "samplers", "unet", "vae", "metrics", "data", "images"}


def imports_in(source: str) -> set[str]:
    """The package modules that `source` imports (the first name below the package)."""
    tree = ast.parse(source)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            # `from . import __version__` reads the package's face, not a module of a layer
            found |= {a.name for a in node.names if (PACKAGE / f"{a.name}.py").exists()}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("diffusevae."):
            found.add(node.module.split(".")[1])
    return found


def project_imports(module: str) -> set[str]:
    return imports_in((PACKAGE / f"{module}.py").read_text())


def existing(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if (PACKAGE / f"{m}.py").exists())


@pytest.mark.parametrize("module", existing(FOUNDATION))
def test_the_foundation_imports_only_itself(module):
    assert project_imports(module) <= FOUNDATION, project_imports(module) - FOUNDATION


def test_rng_imports_nothing_from_the_project():
    assert project_imports("rng") <= {"limits"}  # the seeds' range; limits imports only errors


@pytest.mark.parametrize("module", existing(MATHS))
def test_the_maths_layer_imports_nothing_above_it(module):
    above = project_imports(module) - FOUNDATION - MATHS
    assert not above, f"{module} imports {sorted(above)} from a higher layer"


def test_the_reader_sees_every_kind_of_import():
    source = ("import torch\nfrom .config import Config\n"
              "def f():\n    from .pipeline import DiffuseVAE\n"
              "from diffusevae.train import train_vae\nfrom . import __version__, rng\n")
    assert imports_in(source) == {"config", "pipeline", "train", "rng"}
