"""The package's version, in one place: pyproject.toml reads it from here, and the records a
command writes (environment.json, sampling.json, metrics.json) name it."""

__version__ = "0.1.0"
