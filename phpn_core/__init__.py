"""phpn_core: the post-hoc part-prototype method and its data (no Prefect, no Ray)."""

from .decompose import ClassDecomposition, HeadDecomposition, decompose_class, decompose_head
from .head import Explanation, PartPrototypeHead
from .nmf import NMFResult, nmf

__version__ = "0.1.0"


def __getattr__(name):  # backbones pulls in torchvision: import it on first use
    if name == "split_classifier":
        from .backbones import split_classifier

        return split_classifier
    raise AttributeError(f"module 'phpn_core' has no attribute {name!r}")


__all__ = [
    "nmf", "NMFResult", "decompose_class", "decompose_head", "ClassDecomposition", "HeadDecomposition",
    "PartPrototypeHead", "Explanation", "split_classifier", "__version__",
]
