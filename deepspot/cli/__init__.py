"""The ``deepspot`` command line. Nothing in the package imports this module."""

from importlib import import_module

from .app import app, main

# Each module registers its commands on `app`; a module that is not there yet is simply absent.
for _name in ("train", "export", "runtime", "importer"):
    try:
        import_module(f"{__name__}.{_name}")
    except ModuleNotFoundError as _e:
        if _e.name != f"{__name__}.{_name}":
            raise

__all__ = ["app", "main"]
