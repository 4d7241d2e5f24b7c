"""Stage 2: replace every provable norm subgraph of an ONNX graph with one fused op."""
from .emit import TARGETS
from .rewriter import Fusion, Rejection, RewriteReport, rewrite_file, rewrite_model

__all__ = ["TARGETS", "Fusion", "Rejection", "RewriteReport", "rewrite_file", "rewrite_model"]
