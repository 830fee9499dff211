"""The SPP-net detection pipeline end to end (docs/paper.md §6), from a config, into
workdir/results.json.

  1. data: train/test images with boxes (embedded Fashion-MNIST scenes or TFDS voc/2007);
  2. proposals: selective search (fast), once per image, cached next to the data;
  3. backbone: conv + fc6 + fc7 from a classification checkpoint (config.backbone.workdir;
     trained there first with config.backbone.classification if it has no checkpoint);
  4. SPP-net path: conv maps once per image per scale, every window pooled from its scale;
     fc6, fc7 and a new (classes + 1)-way classifier fine-tuned on cached pooled features
     (25 % positives); box regression on the pooled features; per-class NMS; VOC 2007 mAP;
  5. optionally the R-CNN path on the same windows (each window warped and run through the
     conv layers), fine-tuned and evaluated the same way, with both paths' feature times.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
from flax import nnx

from spp_jax import paths
from spp_jax.detection import proposals as proposals_lib
from spp_jax.detection import scenes as scenes_lib
from spp_jax.detection.bbox_regression import fit_box_regressor
from spp_jax.detection.evaluate import detect, voc_map
from spp_jax.detection.features import WindowFeatures
from spp_jax.detection.head import FC_LAYERS, Scorer, collect_windows, finetune
from spp_jax.train.lock import WorkdirLock
from spp_jax.train.model import model_options


def _model_options(model_cfg) -> dict:
  """config.model -> options of models.create, by training's rules (keys left at None take the
  architecture's own, so a backbone checkpoint matches), with the SPP head. The compute dtype
  stays float32 unless config.model.dtype is set: the window path is tested in float32."""
  opts = model_options(model_cfg)
  opts["head"] = "spp"
  if model_cfg.get("dtype") is None:
    opts["dtype"] = "float32"
  return opts


def build_model(model_cfg, num_classes: int, seed: int):
  from spp_jax import models

  return models.create(model_cfg.name, num_classes=num_classes,
                       rngs=nnx.Rngs(params=seed, dropout=seed + 1), **_model_options(model_cfg))


def _has_checkpoint(workdir: str) -> bool:
  from spp_jax.train.init_from import saved_steps
  return bool(saved_steps(workdir, "backbone.workdir"))


def load_backbone(model, backbone_cfg, log=print) -> str:
  """Copies conv, fc6 and fc7 from a classification checkpoint into model (the classifier
  stays new). Trains the classification config first when the workdir has no checkpoint.
  Returns where the weights came from."""
  workdir = backbone_cfg.get("workdir")
  if not workdir:
    log("backbone: none configured, random conv/fc weights (for smoke tests only)")
    return "random"
  if not _has_checkpoint(workdir):
    cls_cfg = backbone_cfg.get("classification")
    if cls_cfg is None:
      raise ValueError(f"backbone.workdir={workdir!r} has no checkpoint and "
                       f"backbone.classification is not set")
    from spp_jax.train import loop

    log(f"backbone: no checkpoint in {workdir}; training {cls_cfg.model.name} on "
        f"{cls_cfg.data.name} there first")
    loop.train_and_evaluate(cls_cfg, workdir)
  from spp_jax.train import init_from

  params, report = init_from.transfer(nnx.state(model, nnx.Param), workdir,
                                      backbone_cfg.get("step"), fresh=("classifier",))
  nnx.update(model, params)
  log(f"backbone: {len(report.copied)} parameters from {workdir}; new: "
      f"{', '.join(report.reinitialised) or 'none'}")
  return workdir


def _fresh_classifier(model, model_cfg, num_classes: int, seed: int):
  """A copy of model whose classifier is newly initialised (conv, fc6, fc7 kept)."""
  m = nnx.clone(model)
  init = build_model(model_cfg, num_classes, seed)
  nnx.update(m, nnx.state(init, nnx.All(nnx.Param, nnx.PathContains("classifier"))))
  return m


def _test_features(featurize, test, test_props) -> tuple[list, dict]:
  """Pooled features (float16) of every test image's windows, and their timing."""
  feats, seconds = [], []
  for i in range(len(test)):
    t0 = time.perf_counter()
    feats.append(featurize(test.images[i], test_props[i]).astype(np.float16))
    seconds.append(time.perf_counter() - t0)
  # The median leaves out the images that compiled a new shape.
  return feats, dict(test_feature_seconds_per_image=float(np.median(seconds)),
                     test_windows_per_image=float(np.mean([len(p) for p in test_props])))


def _evaluate(model, test, test_feats, test_props, det_cfg, regressor=None) -> dict:
  """VOC mAP of the model's detections on the test windows (optionally box-regressed)."""
  scorer = Scorer(model)
  dets = []
  for i in range(len(test)):
    f = test_feats[i].astype(np.float32)
    if not len(f):
      dets.append(detect(np.zeros((0, test.num_classes + 1)), np.zeros((0, 4)), (1, 1)))
      continue
    refined = None if regressor is None else regressor.refine(f, test_props[i])
    dets.append(detect(scorer(f), test_props[i], test.images[i].shape[:2], refined=refined,
                       nms_iou=det_cfg.nms_iou, score_threshold=det_cfg.score_threshold,
                       max_per_class=det_cfg.max_per_class, max_per_image=det_cfg.max_per_image))
  return voc_map(dets, test)


def _fit_regressor(windows, num_classes: int, reg_cfg):
  fg = windows.labels > 0
  return fit_box_regressor(windows.features[fg], windows.boxes[fg], windows.gt_boxes[fg],
                           windows.labels[fg] - 1, windows.iou[fg], num_classes,
                           min_iou=reg_cfg.min_iou, lam=reg_cfg.lam)


def _run_path(name, featurize, base_model, train, train_props, test, test_props, config, log):
  """Fine-tunes and evaluates one feature path; returns its results."""
  ft = config.finetune
  out = {}
  t0 = time.perf_counter()
  windows = collect_windows(train, train_props, featurize, fg_iou=ft.fg_iou, bg_low=ft.bg_low,
                            negatives_per_image=ft.negatives_per_image,
                            rng=np.random.default_rng(config.seed),
                            positives_per_image=ft.get("positives_per_image"))
  out["train_feature_seconds"] = time.perf_counter() - t0
  out["train_windows"] = dict(positive=int((windows.labels > 0).sum()),
                              negative=int((windows.labels == 0).sum()))
  log(f"[{name}] training windows: {out['train_windows']} ({out['train_feature_seconds']:.1f} s)")
  test_feats, timing = _test_features(featurize, test, test_props)
  out.update(timing)
  log(f"[{name}] test features: {out['test_feature_seconds_per_image'] * 1e3:.1f} ms per image "
      f"(median; {out['test_windows_per_image']:.0f} windows per image)")

  def evaluate(model, regressor=None):
    return _evaluate(model, test, test_feats, test_props, config.detection, regressor)

  untrained = _fresh_classifier(base_model, config.model, test.num_classes + 1, config.seed + 7)
  untrained.eval()
  out["untrained"] = evaluate(untrained)
  log(f"[{name}] untrained head: mAP {out['untrained']['map_11point']:.4f} (11-point)")

  model = nnx.clone(base_model)
  t0 = time.perf_counter()
  losses = finetune(model, windows, steps=ft.steps, batch_size=ft.batch_size,
                    positive_fraction=ft.positive_fraction, learning_rate=ft.learning_rate,
                    momentum=ft.momentum, weight_decay=ft.weight_decay, seed=config.seed,
                    log_every=ft.log_every, log=lambda m: log(f"[{name}]{m}"))
  out["finetune_seconds"] = time.perf_counter() - t0
  out["finetune_loss"] = dict(first=losses[0], last=float(np.mean(losses[-20:])))
  final = out["no_bbox_regression"] = evaluate(model)
  log(f"[{name}] fine-tuned: mAP {final['map_11point']:.4f} (11-point), "
      f"{final['map_area']:.4f} (area)")
  if config.bbox_regression.enabled:
    reg = _fit_regressor(windows, test.num_classes, config.bbox_regression)
    final = out["bbox_regression"] = evaluate(model, reg)
    log(f"[{name}] + box regression: mAP {final['map_11point']:.4f} (11-point), "
        f"{final['map_area']:.4f} (area)")
  out["map_11point"] = final["map_11point"]
  out["map_area"] = final["map_area"]
  return out


def run(config, workdir: str, log=print) -> dict:
  """Runs the pipeline of `config` (see configs/detect_demo.py); returns and saves results.

  workdir: local or gs://; one run at a time holds it (workdir/.lock, train/lock.py), and
  config.json and results.json are replaced atomically, never left half written.
  """
  with WorkdirLock(workdir):
    return _run(config, paths.path(workdir, "workdir"), log)


def _run(config, workdir, log) -> dict:
  start = time.perf_counter()
  workdir.mkdir(parents=True, exist_ok=True)
  paths.write_atomic(workdir / "config.json", config.to_json_best_effort(indent=1))

  data = config.data
  train = scenes_lib.load_scenes(data, data.train_split)
  test = scenes_lib.load_scenes(data, data.eval_split)
  log(f"data: {data.name}: {len(train)} train / {len(test)} test images, "
      f"{sum(len(b) for b in test.boxes)} test objects, {test.num_classes} classes "
      f"({time.perf_counter() - start:.1f} s)")
  cache_dir = (scenes_lib.split_dir(data) if data.name == scenes_lib.EMBEDDED else
               os.path.join(data.get("data_dir") or os.path.expanduser("~/tensorflow_datasets"),
                            "spp_jax_proposals", data.name.replace("/", "_")))
  t0 = time.perf_counter()
  train_props = proposals_lib.cached_proposals(train.images, cache_dir, data.train_split,
                                               config.proposals)
  test_props = proposals_lib.cached_proposals(test.images, cache_dir, data.eval_split,
                                              config.proposals)
  recall = proposals_lib.recall(test_props, test.boxes, 0.5)
  log(f"proposals ({config.proposals.method}): "
      f"{np.mean([len(p) for p in test_props]):.0f} per test image, recall@0.5 {recall:.3f} "
      f"({time.perf_counter() - t0:.1f} s)")

  num_classes = test.num_classes + 1
  model = build_model(config.model, num_classes, config.seed)
  source = load_backbone(model, config.backbone, log)
  model.eval()
  features = WindowFeatures(model, config.features.scales, data.mean, data.std,
                            max_aspect=config.features.max_aspect,
                            window_block=config.features.window_block)
  results = dict(data=data.name, train_images=len(train), test_images=len(test),
                 proposals=dict(method=config.proposals.method, recall_at_05=recall,
                                per_test_image=float(np.mean([len(p) for p in test_props]))),
                 backbone=source, scales=list(features.scales))
  results["spp"] = _run_path("spp", features.spp, model, train, train_props, test, test_props,
                             config, log)
  if config.compare_rcnn:
    results["rcnn"] = _run_path("rcnn", features.rcnn, model, train, train_props, test,
                                test_props, config, log)
    results["feature_speedup_rcnn_over_spp"] = (
        results["rcnn"]["test_feature_seconds_per_image"]
        / results["spp"]["test_feature_seconds_per_image"])
  results["map_11point"] = results["spp"]["map_11point"]
  results["map_area"] = results["spp"]["map_area"]
  results["seconds"] = time.perf_counter() - start
  paths.write_atomic(workdir / "results.json", json.dumps(results, indent=1))
  log(f"results in {workdir / 'results.json'}: mAP {results['map_11point']:.4f} "
      f"(VOC07 11-point), {results['map_area']:.4f} (area); {results['seconds']:.0f} s")
  return results


__all__ = ["run", "load_backbone", "build_model", "FC_LAYERS"]
