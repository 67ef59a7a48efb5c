"""The isolhub version (kept equal to pyproject.toml's `version`)."""

__all__ = ["__version__"]

__version__ = "0.1.0"
