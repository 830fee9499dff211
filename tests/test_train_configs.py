"""Every shipped config and variant passes the trainer's checks against the real networks."""

from __future__ import annotations

import importlib.util
import os

import pytest

from spp_jax import models
from spp_jax.train import validate_config
from spp_jax.train.model import model_options
from spp_jax.train.variants import parse_arg

_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
_FILES = ("demo.py", "zf5_imagenet.py", "imagenette.py")
_VARIANTS = (None, "single", "multi", "uniform", "nospp", "levels=4321", "full_image", "tiny",
             "multi,tiny", "nospp,tiny", "full_image,tiny", "uniform,levels=421,tiny",
             "single,feature_views", "feature_views,tiny")


def _load(name):
  spec = importlib.util.spec_from_file_location(name[:-3], os.path.join(_CONFIGS, name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("name", _FILES)
def test_docstring_gives_launch_command(name):
  doc = _load(name).__doc__
  assert f"python -m spp_jax.main --config configs/{name}" in doc


@pytest.mark.parametrize("arg", _VARIANTS)
@pytest.mark.parametrize("name", _FILES)
def test_variant_is_valid(name, arg):
  config = _load(name).get_config(arg)
  info = validate_config(config, device_count=1, process_count=1, models=models)
  variants = parse_arg(arg)
  if variants.get("nospp"):
    assert config.model.head == "fixed"
    assert tuple(config.train.sizes) == (info.base_size,)
  if variants.get("multi"):
    assert len(config.train.sizes) == 2 and config.train.schedule == "alternate"
  if variants.get("uniform"):
    assert config.train.schedule == "uniform"
  if variants.get("full_image"):
    assert config.train.mode == "full_image"
  if variants.get("feature_views"):
    assert [v.kind for v in config.eval.views].count("feature_multiview") == 1
  if "levels" in variants:
    assert len(config.model.spp_levels) == len(str(variants["levels"]))
  if variants.get("tiny"):
    assert config.data.name.startswith("multiscale_fashion_mnist")
    assert config.train.num_epochs <= 2


def test_zf5_imagenet_is_the_papers_protocol():
  c = _load("zf5_imagenet.py").get_config()
  spec = models.spec(c.model.name, **model_options(c.model))
  assert (spec.name, spec.option("spp_levels"), spec.option("fc_width")) == (
      "zf5", ((6, 6), (3, 3), (2, 2), (1, 1)), 4096)
  assert (c.data.resize_short, c.data.crop_size, c.data.flip) == (256, 224, True)
  assert (c.optimizer.learning_rate, c.optimizer.momentum, c.optimizer.schedule) == (
      0.01, 0.9, "step")
  assert len(c.optimizer.decay_epochs) == 2 and c.optimizer.decay_factor == 0.1
  assert c.train.num_epochs == 70
  assert tuple(_load("zf5_imagenet.py").get_config("multi").train.sizes) == (224, 180)
  assert {v.kind for v in c.eval.views} == {"center", "full", "ten_view"}


def test_unknown_variant_is_an_error():
  with pytest.raises(ValueError, match="unknown config variant"):
    _load("demo.py").get_config("fast")


def test_the_small_net_gets_its_own_levels_and_width_unless_a_config_sets_them():
  """config.model.name = "small" alone: (4, 2, 1) and 256 from models/small.py, not ZF-5's."""
  c = _load("zf5_imagenet.py").get_config()
  c.model.name = "small"
  spec = models.spec(c.model.name, **model_options(c.model))
  assert (spec.option("spp_levels"), spec.option("fc_width")) == (((4, 4), (2, 2), (1, 1)), 256)
  c.model.spp_levels = (6, 3, 2, 1)
  spec = models.spec(c.model.name, **model_options(c.model))
  assert (spec.option("spp_levels"), spec.option("fc_width")) == (((6, 6), (3, 3), (2, 2), (1, 1)), 256)


def test_demo_config_uses_the_small_nets_own_levels():
  c = _load("demo.py").get_config()
  assert c.model.spp_levels is None
  assert models.spec("small", **model_options(c.model)).option("spp_levels") == ((4, 4), (2, 2), (1, 1))
