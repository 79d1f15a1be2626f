"""The ``deepspot`` command line. Nothing in the package imports this module."""

# Each module registers its commands on `app`, in the order `deepspot --help` lists them: the path a model takes.
from . import train, importer, export, runtime  # noqa: F401, I001
from .app import app, main

__all__ = ["app", "main"]
