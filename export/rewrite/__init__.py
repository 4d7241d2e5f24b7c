"""Replace every provable norm subgraph of an ONNX graph with one fused op (stage 2)."""
from .emit import TARGETS
from .rewriter import (Fusion, Rejection, RewriteReport, describe_counts, describe_unmatched_means,
                       describe_without_epsilon, rewrite_file, rewrite_model)

__all__ = ["TARGETS", "Fusion", "Rejection", "RewriteReport", "describe_counts", "describe_unmatched_means",
           "describe_without_epsilon", "rewrite_file", "rewrite_model"]
