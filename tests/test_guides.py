"""The README and the guides in docs/ say what the code does: every `diffusevae` command in
their shell blocks parses (the subcommand exists, its flags and values are accepted), the
training commands' resolved configs are valid (`--dry-run`), every relative link and anchor
points at something that exists, and the README's Python example runs on the shipped model.

The checker is tested on commands that are wrong on purpose, so that it cannot pass by
accepting anything."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import click
import pytest

from diffusevae.cli import cli, main

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}


# ---- the commands of the shell blocks ----------------------------------------------------

@dataclass(frozen=True)
class Command:
    page: str
    line: int
    args: tuple[str, ...]  # what follows `diffusevae`: the subcommand and its flags

    def __str__(self) -> str:
        return f"{self.page}:{self.line}: diffusevae {shlex.join(self.args)}"


def fenced_blocks(text: str):
    """(language, first line number, lines) of each fenced code block of a markdown text."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^\s*(```+|~~~+)\s*([\w+-]*)", lines[i])
        if not m:
            i += 1
            continue
        fence, language, start, body = m.group(1), m.group(2).lower(), i + 2, []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        i += 1
        yield language, start, body


def logical_lines(body: list[str], start: int):
    """(line number, text) of each shell line, `\\` continuations joined and a `$ ` prompt
    dropped."""
    i = 0
    while i < len(body):
        number, text = start + i, body[i]
        while text.rstrip().endswith("\\") and i + 1 < len(body):
            i += 1
            text = text.rstrip()[:-1] + " " + body[i].strip()
        i += 1
        text = text.strip()
        if text.startswith("$ "):
            text = text[2:]
        yield number, text


def diffusevae_args(line: str) -> list[list[str]]:
    """The argument lists given to `diffusevae` on one shell line: `diffusevae ...`,
    `python -m diffusevae ...` and launcher lines (`torchrun ... -m diffusevae -- ...`),
    each part of a `&&`, `||` or `;` chain on its own. `make` and other lines give none."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:  # an unbalanced quote: not a command line
        return []
    commands, part = [], []
    for word in [*words, "&&"]:
        if word in ("&&", "||", ";", "|"):
            commands.append(part)
            part = []
        else:
            part.append(word)
    found = []
    for part in commands:
        if part and part[0] == "diffusevae":
            found.append(part[1:])
            continue
        for i in range(len(part) - 1):  # python -m diffusevae, torchrun ... -m diffusevae
            if part[i] == "-m" and part[i + 1] == "diffusevae":
                rest = part[i + 2:]
                found.append(rest[1:] if rest[:1] == ["--"] else rest)
                break
    return found


def commands_of(page: Path) -> list[Command]:
    text = page.read_text(encoding="utf-8")
    found = []
    for language, start, body in fenced_blocks(text):
        if language not in SHELL_LANGUAGES:
            continue
        for number, line in logical_lines(body, start):
            for args in diffusevae_args(line):
                found.append(Command(page.relative_to(ROOT).as_posix(), number, tuple(args)))
    return found


ALL_COMMANDS = [c for page in PAGES for c in commands_of(page)]


# ---- the checker -------------------------------------------------------------------------

# Files the `--dry-run` of the training commands reads although click does not require them to
# exist: made empty (an empty config file changes nothing).
READ_BY_DRY_RUN = {"--config"}


def existing_path_options(command: click.Command) -> dict[str, click.Path]:
    """Each flag of `command` whose value must be an existing path, and its type."""
    out = {}
    for param in command.params:
        if isinstance(param, click.Option) and isinstance(param.type, click.Path) and (
                param.type.exists or READ_BY_DRY_RUN & set(param.opts)):
            for flag in param.opts:
                out[flag] = param.type
    return out


def make_paths(command: click.Command, args: list[str], where: Path) -> list[str]:
    """Create, under `where`, the paths that `args` names for flags that need an existing
    path (a file or a folder, as the flag takes), so that parsing checks the flag and not
    this machine's files. `~` becomes a folder under `where`, as the shell would expand it."""
    home = where / "home"
    args = [str(home) + a[1:] if a == "~" or a.startswith("~/") else a for a in args]
    flags = existing_path_options(command)
    for flag, value in zip(args, args[1:]):
        if flag not in flags or value.startswith("-"):
            continue
        path = Path(value) if Path(value).is_absolute() else where / value
        if path.exists() or not path.resolve().is_relative_to(where.resolve()):
            continue  # an absolute path outside: left as it is (and refused if missing)
        kind = flags[flag]
        folder = kind.dir_okay and (
            not kind.file_okay or value.endswith("/") or not Path(value).suffix)
        if folder:
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"")
    return args


def parse(args: list[str] | tuple[str, ...], where: Path) -> click.Command:
    """Parse `args` as `diffusevae ARGS` would, in the folder `where` (the paths that must
    exist are made there); raises click's error for an unknown command, an unknown flag or a
    refused value. Returns the subcommand."""
    args = list(args)
    group = click.Context(cli, info_name="diffusevae")
    if not args:
        raise click.UsageError("no subcommand", ctx=group)
    name, command, rest = cli.resolve_command(group, args)
    rest = make_paths(command, rest, where)
    cwd = os.getcwd()
    os.chdir(where)
    try:
        command.make_context(name, rest, parent=group)
    except click.exceptions.Exit as exc:  # --help, --version
        if exc.exit_code != 0:
            raise
    finally:
        os.chdir(cwd)
    return command


def dry_run(args: list[str] | tuple[str, ...], where: Path, capsys) -> tuple[int, str]:
    """Run a command that has `--dry-run` with that flag, in `where` (the command line's
    `main`, so its errors are the one-line refusals users see): exit status and stderr."""
    name, *rest = args
    rest = make_paths(cli.get_command(click.Context(cli), name), rest, where)
    cwd = os.getcwd()
    os.chdir(where)
    capsys.readouterr()
    try:
        main([name, *rest, "--dry-run"])
        status = 0
    except SystemExit as exc:
        status = exc.code
    finally:
        os.chdir(cwd)
    return status, capsys.readouterr().err


def check(command: Command | tuple[str, ...], where: Path, capsys) -> None:
    """Parse the command; run it with `--dry-run` where it has that flag."""
    args = list(command.args if isinstance(command, Command) else command)
    sub = parse(args, where)
    if any(p.name == "dry_run" for p in sub.params) and "--help" not in args \
            and "-h" not in args:
        status, err = dry_run(args, where, capsys)
        assert status == 0, f"{command}: --dry-run exited {status}: {err.strip()}"


@pytest.fixture
def workdir(tmp_path):
    """A folder that looks like the repository's root to relative paths: `models/` is there
    (the commands that read the shipped model find it), everything else is made as needed."""
    (tmp_path / "models").symlink_to(ROOT / "models", target_is_directory=True)
    return tmp_path


# ---- the tests ---------------------------------------------------------------------------

def test_the_pages_hold_commands_to_check():
    """The extraction finds the commands: every page but the method's shows some, and every
    subcommand appears in README.md or a guide."""
    assert len(ALL_COMMANDS) > 80
    pages = {c.page for c in ALL_COMMANDS}
    assert "README.md" in pages and "docs/training.md" in pages and "docs/sampling.md" in pages
    shown = {c.args[0] for c in ALL_COMMANDS if c.args}
    assert set(cli.commands) <= shown, f"never shown: {sorted(set(cli.commands) - shown)}"


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=str)
def test_every_documented_command_parses(command, workdir, capsys):
    check(command, workdir, capsys)


def test_the_readme_lists_every_command():
    """The README's command list has a line for each subcommand `diffusevae --help` lists."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for name in cli.commands:
        assert re.search(rf"^\| `{re.escape(name)}` \|", text, re.M), name


@pytest.mark.parametrize("wrong, error", [
    (("sample", "--run", "runs/fm", "--stpes", "10"), click.NoSuchOption),   # a misspelt flag
    (("smaple", "--run", "runs/fm"), click.UsageError),                      # a misspelt command
    (("sample", "--run", "runs/fm", "--sampler", "dpmpp"), click.BadParameter),  # no such value
    (("sample", "--run", "runs/fm", "--n", "ten"), click.BadParameter),      # not a number
    (("train-vae", "--preset", "fashion-mnist"), click.MissingParameter),    # --run is required
    (("edit", "--run", "runs/fm", "--invert", "--attribute"), click.BadOptionUsage),  # no value
    (("interpolate", "--run", "runs/fm", "--image-a", "/no/such/boot.png"), click.BadParameter),
])
def test_the_checker_refuses_wrong_commands(wrong, error, workdir, capsys):
    with pytest.raises(error):
        check(wrong, workdir, capsys)


def test_the_dry_run_refuses_a_config_that_does_not_resolve(workdir, capsys):
    with pytest.raises(AssertionError, match="--dry-run exited 2"):
        check(("train-vae", "--run", "runs/x", "--set", "vae.no_such_field=1"), workdir, capsys)
    with pytest.raises(AssertionError, match="--dry-run exited 2"):
        check(("train-refiner", "--run", "runs/x", "--batch-size", "0"), workdir, capsys)


def test_the_extraction_reads_continuations_chains_and_launchers():
    text = ("```bash\n"
            "diffusevae sample --run r \\\n    --n 4   # a comment\n"
            "torchrun --nproc_per_node 2 -m diffusevae -- evaluate --run r\n"
            "diffusevae fit-prior --run r && \\\n    diffusevae sample --run r --prior gmm\n"
            "make demo\n"
            "```\n```python\ndiffusevae sample --nothing\n```\n")
    found = []
    for language, start, body in fenced_blocks(text):
        if language in SHELL_LANGUAGES:
            for _, line in logical_lines(body, start):
                found += diffusevae_args(line)
    assert found == [["sample", "--run", "r", "--n", "4"], ["evaluate", "--run", "r"],
                     ["fit-prior", "--run", "r"], ["sample", "--run", "r", "--prior", "gmm"]]


# ---- links -------------------------------------------------------------------------------

LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def prose(text: str) -> str:
    """The text outside fenced code blocks and inline code spans."""
    text = re.sub(r"^\s*(```+|~~~+).*?^\s*\1\s*$", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as '-'.
    Emphasis marks go; an underscore inside a word or a code span stays (`speed_quality.py`)."""
    parts = re.split(r"(`[^`]*`)", heading.strip())
    heading = "".join(p[1:-1] if p.startswith("`") else
                      re.sub(r"\*\*|\*|(?<!\w)_(?=\w)|(?<=\w)_(?!\w)", "", p)
                      for p in parts).lower()
    heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    kept = "".join(ch for ch in heading
                   if ch in " -_" or unicodedata.category(ch)[0] in "LN")
    return kept.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in prose_lines(page.read_text(encoding="utf-8")):
        out.update(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", line))  # <a id="..."></a>
        m = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def prose_lines(text: str) -> list[str]:
    out, fence = [], None
    for line in text.splitlines():
        m = re.match(r"^\s*(```+|~~~+)", line)
        if fence is None and m:
            fence = m.group(1)
        elif fence is not None and line.strip().startswith(fence):
            fence = None
        elif fence is None:
            out.append(line)
    return out


def links_of(page: Path) -> list[str]:
    return LINK.findall(prose("\n".join(prose_lines(page.read_text(encoding="utf-8")))))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_points_at_something_that_exists(page):
    broken = []
    for target in links_of(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = page if not path else (page.parent / path)
        if not file.exists():
            broken.append(f"{target}: no such file")
            continue
        if not file.resolve().is_relative_to(ROOT):
            broken.append(f"{target}: outside the repository")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading with that anchor")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_link_checker_finds_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# A title\n\nSee [this](missing.md), [that](#a-title) and "
                    "[the other](#no-such-heading); `[code](not-a-link.md)`.\n\n"
                    "```bash\n[x](inside-a-block.md)\n```\n")
    assert links_of(page) == ["missing.md", "#a-title", "#no-such-heading"]
    assert anchors(page) == {"a-title"}
    assert slug("The shipped model, `models/fashion-mnist/`, and what it is not yet") == \
        "the-shipped-model-modelsfashion-mnist-and-what-it-is-not-yet"


# ---- the README's Python example ---------------------------------------------------------

def test_the_readmes_python_example_runs_on_the_shipped_model(workdir):
    """The first Python block of the README, run as it stands from a folder where
    `models/fashion-mnist` is the shipped model."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = [body for language, _, body in fenced_blocks(text) if language == "python"]
    assert blocks, "README.md has no Python example"
    code = "\n".join(blocks[0])
    assert len([line for line in blocks[0] if line.strip()]) <= 10
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    done = subprocess.run([sys.executable, "-c", code], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    written = sorted(p.name for p in workdir.iterdir() if p.suffix == ".png")
    assert written, "the example wrote no picture"
