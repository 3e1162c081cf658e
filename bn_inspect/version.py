"""This package's version, in one place: pyproject.toml reads it from here, every room imports it."""

__version__ = "0.1.0"
