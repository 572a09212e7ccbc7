"""`python -m diffusevae` is the `diffusevae` command."""

from .cli import main

main()
