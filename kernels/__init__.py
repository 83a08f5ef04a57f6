"""Numerical core of nearstore: pure functions and small sketches over torch tensors, CPU or GPU."""

from __future__ import annotations

from kernels.agreement import agreement_scores, consensus_direction, residual_scores, sketch_basis
from kernels.augmentation_similarity import expected_similarity, sas_greedy
from kernels.cross_covariance import cross_covariance_greedy
from kernels.facility_location import facility_location, facility_location_of_factors
from kernels.frequent_directions import FrequentDirections
from kernels.gradients import gradients_of_factors, last_layer_factors, last_layer_gradients
from kernels.kmeans import StreamingKMeans
from kernels.label_issues import ConfidentJoint, label_issues
from kernels.maxvol import maxvol, pivoted_cholesky
from kernels.seeds import seeded_generator
from kernels.topk import StreamingTopK

__all__ = [
    "ConfidentJoint",
    "FrequentDirections",
    "StreamingKMeans",
    "StreamingTopK",
    "agreement_scores",
    "consensus_direction",
    "cross_covariance_greedy",
    "expected_similarity",
    "facility_location",
    "facility_location_of_factors",
    "gradients_of_factors",
    "label_issues",
    "last_layer_factors",
    "last_layer_gradients",
    "maxvol",
    "pivoted_cholesky",
    "residual_scores",
    "sas_greedy",
    "seeded_generator",
    "sketch_basis",
]
