"""Bounds on what a user can hand a command, each stated once: counts, sizes, floats, seeds, and
the JSON and YAML files a command reads.

Every bound is far beyond any real use, and small enough that no index, size or allocation
derived from it overflows. The config classes check them (config.py), the command line's types
are built from them (cli/options.py), and the library functions that take such a value from a
caller check it too (latents.check_lambdas, rng.generator). JSON and YAML are parsed with
limits on size, nesting and (YAML) aliases expanded, so that a hostile file is refused in one
line instead of exhausting memory or the stack. Pure Python: importing it costs nothing.
"""

from __future__ import annotations

import itertools
import json
import numbers
import re
from typing import Any

from .errors import ConfigError, quote

# --------------------------------------------------------------------------------------------
# Counts, sizes, floats and seeds
# --------------------------------------------------------------------------------------------

SEED_MAX = 2**64 - 1  # a seed: what torch's generators take; rng.py uses all 64 bits
MAX_SAMPLES = 10**8  # images one command draws, scores or writes (--n): 10^8
MAX_BATCH = 65_536  # images in one batch
MAX_STEPS = 10**9  # optimiser steps, and the intervals counted in them
MAX_EPOCHS = 10**6
MAX_TIMESTEPS = 100_000  # the diffusion's T, so also sampling and inversion steps
MAX_IMAGE_SIZE = 4096  # pixels a side
MAX_WIDTH = 65_536  # channels of a layer, dimensions of z
MAX_LEVELS = 12  # resolutions of the UNet (channel_mults), blocks per level
MAX_VAE_BLOCKS = 1024  # residual blocks of one VAE stack (the paper's largest has ~60)
MAX_WORKERS = 256  # data-loading processes
MAX_MINUTES = 10**7  # --time-limit (19 years)
MAX_LR = 10.0  # a learning rate beyond it only diverges
MAX_TEMPERATURE = 10.0  # the initial noise's scale: beyond it the refiner sees no image
MAX_ETA = 1.0  # DDIM's eta: 0 deterministic, 1 DDPM's variance (Song et al. 2021, eq. 16)
MAX_GUIDANCE = 100.0  # classifier-free guidance weight w
MAX_SNR_GAMMA = 1e4  # Min-SNR-gamma: past it every timestep of a linear schedule keeps weight 1
MAX_FIXED_POINT = 1000  # fixed-point iterations per inversion step (10-20 are plenty)
MAX_LAMBDA = 100.0  # |lambda| of an edit z + lambda d (1: the whole gap between two groups)
MAX_LAMBDAS = 64  # lambdas of one edit (the columns of its grids)
MAX_EDIT_IMAGES = 4096  # images x lambdas of one edit, all held in memory for its grids
MAX_FRAMES = 1000  # frames of an interpolation, all held in memory for its GIF
MAX_COMPONENTS = 1024  # components of the Ex-PDE mixture prior
MAX_KEPT = 200_000  # features kept per set for KID (memory: this x the feature width)
MAX_SUBSETS = 10_000  # KID subsets, IS splits
MAX_THREADS = 1024
MAX_CLASSIFIER_WIDTH = 1024  # channels of the evaluation classifier's first block


def check_seed(seed: Any, what: str = "seed") -> int:
    """`seed` if it is an integer the generators take whole, [0, 2^64 - 1], else a ConfigError."""
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) \
            or not 0 <= seed <= SEED_MAX:
        raise ConfigError(f"{what} must be an integer from 0 to 2^64 - 1 = {SEED_MAX}; got "
                          f"{quote(seed)}")
    return int(seed)


# --------------------------------------------------------------------------------------------
# Reading the JSON and YAML a user can hand a command: size, nesting and aliases bounded
# --------------------------------------------------------------------------------------------

MAX_TEXT_BYTES = 16 * 2**20  # a JSON or YAML file a command reads (configs, records, manifests)
MAX_NESTING = 64  # levels of lists and mappings in one
MAX_YAML_VALUES = 100_000  # values of a YAML document, counted with its aliases expanded

_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_BRACKET_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def too_big(size: int, where: str, error: type[Exception]) -> None:
    if size > MAX_TEXT_BYTES:
        raise error(f"{where} holds {size} bytes, more than the {MAX_TEXT_BYTES} a file read "
                    "here may hold; it is not a file diffusevae wrote or reads")


def _too_deep(depth: int, where: str, error: type[Exception]) -> None:
    if depth > MAX_NESTING:
        raise error(f"{where} nests lists or mappings more than {MAX_NESTING} levels deep; it "
                    "is not a file diffusevae wrote or reads")


def parse_json(text: str | bytes, where: str, error: type[Exception] = ConfigError) -> Any:
    """`text` as JSON, refused (`error`, naming `where`) past MAX_TEXT_BYTES or MAX_NESTING
    levels: the nesting is counted before parsing, which recurses once per level."""
    too_big(len(text), where, error)
    if isinstance(text, bytes):
        try:
            text = text.decode()
        except UnicodeDecodeError as exc:
            raise error(f"{where} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    brackets = re.sub(r"[^\[\]{}]", "", _JSON_STRING.sub("", text))
    _too_deep(max(itertools.accumulate(map(_BRACKET_STEP.__getitem__, brackets)), default=0),
              where, error)
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise error(f"{where} is not valid JSON ({str(exc)[:200]})") from None


def _yaml_children(node: Any) -> list:
    import yaml

    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_yaml_graph(root: Any, where: str) -> None:
    """Refuse a YAML document whose values, aliases expanded, pass MAX_YAML_VALUES (an alias
    bomb: a few lines that expand to billions of values), that nests past MAX_NESTING, or that
    holds itself. Walks the graph of nodes once, without expanding it."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key, children = id(node), _yaml_children(node)
        if finished:
            on_path.discard(key)
            size[key] = min(MAX_YAML_VALUES + 1, 1 + sum(size[id(c)] for c in children))
            depth[key] = 1 + max((depth[id(c)] for c in children), default=0)
            continue
        if key in size:
            continue
        if key in on_path:
            raise ConfigError(f"{where}: an alias refers to a value that holds it; a config "
                              "cannot contain itself")
        on_path.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in size)
    _too_deep(depth[id(root)] - 1, where, ConfigError)
    if size[id(root)] > MAX_YAML_VALUES:
        raise ConfigError(f"{where} holds more than {MAX_YAML_VALUES} values once its aliases "
                          "(*name) are expanded; write the values out instead")


def _check_yaml_nesting(text: str, where: str) -> None:
    """Count the levels in the parser's events (a loop) before the composer (which recurses
    once per level) builds them."""
    import yaml

    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            _too_deep(depth, where, ConfigError)
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def parse_yaml(text: str, where: str) -> Any:
    """`text` as YAML (safe: plain values only), refused with a ConfigError naming `where` past
    MAX_TEXT_BYTES, MAX_NESTING levels or MAX_YAML_VALUES values (aliases expanded)."""
    import yaml

    too_big(len(text), where, ConfigError)
    loader = yaml.SafeLoader(text)
    try:
        _check_yaml_nesting(text, where)
        node = loader.get_single_node()
        if node is None:
            return None
        _check_yaml_graph(node, where)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)  # YAML's own message spans several lines
        why = (f"line {mark.line + 1}, column {mark.column + 1}: {exc.problem}" if mark
               else str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise ConfigError(f"cannot parse {where}: {why}") from None
    finally:
        loader.dispose()
