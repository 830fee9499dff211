"""SPP-net object detection (docs/paper.md §6): data, proposals, window features, fine-tuning,
mAP.

  python -m spp_jax.main --config configs/detect_demo.py --workdir workdirs/detect_demo
"""

from spp_jax.detection.run import build_model, load_backbone, run

__all__ = ["build_model", "load_backbone", "run"]
