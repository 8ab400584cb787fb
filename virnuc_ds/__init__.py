"""virnuc-ds: VirNucPro's embedding and prediction steps on every GPU of a node (DeepSpeed-Inference)."""

from .version import __version__

__all__ = ["__version__"]
