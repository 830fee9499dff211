"""Evaluation metrics."""
from spp_jax.metrics.voc import average_precision, voc_ap, voc_detection_ap

__all__ = ["average_precision", "voc_ap", "voc_detection_ap"]
