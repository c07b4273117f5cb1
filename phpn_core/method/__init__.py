"""The method, pure torch: NMF discovery, scaling + refinement, and the part-prototype head.

Imports only torch, numpy, safetensors and the standard library; nothing else of phpn_core.

- :mod:`~phpn_core.method.nmf`: batched randomized-HALS NMF, ``X [B, m, D] ~ E [B, m, k] @ P [B, k, D]``.
- :mod:`~phpn_core.method.rows`: where X is read from (a batch in memory, or one class streamed in row blocks).
- :mod:`~phpn_core.method.decompose`: per class, ``v_c [D] == sum_i p~_i`` exactly from the features ``F_c``;
  :mod:`~phpn_core.method.refine` its refinement step.
- :mod:`~phpn_core.method.stages`: seconds and reads of X per stage, on request.
- :mod:`~phpn_core.method.head`: :class:`PartPrototypeHead`, logits and explanations from a feature map.
"""

from phpn_core.method.decompose import (
    ClassDecomposition,
    HeadDecomposition,
    decompose_class,
    decompose_head,
)
from phpn_core.method.head import Explanation, PartPrototypeHead
from phpn_core.method.nmf import NMFResult, nmf
from phpn_core.method.semi_nmf import semi_nmf

__all__ = [
    "nmf", "NMFResult", "decompose_class", "decompose_head", "ClassDecomposition", "HeadDecomposition",
    "PartPrototypeHead", "Explanation", "semi_nmf",
]
