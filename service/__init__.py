"""bertserve's serving side: ``python -m service`` (service/__main__.py); the modules are mapped in docs/SERVICE.md."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("bertserve")
except PackageNotFoundError:  # run from a source tree that was not installed
    __version__ = "0+unknown"
