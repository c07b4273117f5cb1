"""How good a decomposition is: numbers and tensors only (drawing them is :mod:`phpn_core.report`'s job).

- :mod:`~phpn_core.evaluation.parity`: accuracy parity of the decomposed head, head reconstruction error;
- :mod:`~phpn_core.evaluation.protoeval`: ProtoEval consistency and stability (Huang et al., ICCV 2023), of a
  head (``protoeval``) or of any model's prototype maps (``protoeval_maps``);
- :mod:`~phpn_core.evaluation.keypoint_free`: deletion/insertion AUC, box stability, redundancy (no keypoints needed);
- :mod:`~phpn_core.evaluation.faithfulness`: completeness, sensitivity, linearity, symmetry as measured numbers;
- :mod:`~phpn_core.evaluation.baselines`: plain NMF, Deep Feature Factorization, Grad-CAM on the same images;
- :mod:`~phpn_core.evaluation.suite`: all of the above as one JSON-ready summary.

May import method, data, errors; never storage, models' builders, report, Prefect or Ray.
"""

from phpn_core.evaluation.faithfulness import (
    channel_attributions,
    completeness_error,
    linearity_check,
    sensitivity_check,
    symmetry_check,
)
from phpn_core.evaluation.keypoint_free import (
    DeletionInsertionResult,
    KeypointFreeResult,
    box_stability,
    deletion_insertion,
    keypoint_free,
    keypoint_free_gradcam,
    keypoint_free_maps,
    map_redundancy,
)
from phpn_core.evaluation.parity import accuracy_parity, head_reconstruction_error
from phpn_core.evaluation.protoeval import (
    ClassProtoEval,
    ConsistencyResult,
    ProtoEvalResult,
    StabilityResult,
    box_half_size_px,
    consistency,
    part_coverage,
    peak_locations,
    protoeval,
    protoeval_maps,
    stability,
)

__all__ = [
    "accuracy_parity", "head_reconstruction_error",
    "box_half_size_px", "peak_locations", "part_coverage", "consistency", "stability", "protoeval",
    "protoeval_maps",
    "ConsistencyResult", "StabilityResult", "ClassProtoEval", "ProtoEvalResult",
    "deletion_insertion", "box_stability", "map_redundancy", "keypoint_free_maps", "keypoint_free",
    "keypoint_free_gradcam", "DeletionInsertionResult", "KeypointFreeResult",
    "completeness_error", "sensitivity_check", "linearity_check", "symmetry_check", "channel_attributions",
]
