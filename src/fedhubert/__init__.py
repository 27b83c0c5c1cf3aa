"""fedhubert: federated self-supervised HuBERT pretraining, distillation and SUPERB evaluation on Flower."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fedhubert")
except PackageNotFoundError:  # running from a source tree that was not pip-installed
    __version__ = "0.0.0+unknown"
