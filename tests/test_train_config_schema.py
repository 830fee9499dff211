"""The config schema: one default per key, every value checked against its key's rule."""

from __future__ import annotations

import pytest

from spp_jax.train.config_schema import (SCHEMA, VIEW, ConfigError, Key, check_keys, default,
                                         default_config, view)


def _keys(schema, prefix=""):
  for name, key in schema.items():
    if isinstance(key, dict):
      yield from _keys(key, f"{prefix}{name}.")
    else:
      yield prefix + name, key


def test_every_default_is_allowed_by_its_own_rule():
  for path, key in _keys(SCHEMA):
    assert isinstance(key, Key) and key.doc, path
    if path != "eval.views":
      assert key.rule.allows(key.default), (path, key.default, key.rule.describe())
  check_keys(default_config())


def test_default_config_holds_every_schema_default():
  c = default_config()
  for path, key in _keys(SCHEMA):
    node = c
    for part in path.split("."):
      node = node[part]
    if path != "eval.views":
      assert node == key.default or tuple(node) == key.default, path
  assert default("data.crop_size") == 224
  assert [v.kind for v in c.eval.views] == ["center", "full", "ten_view"]
  assert set(c.eval.views[0]) == set(VIEW)


@pytest.mark.parametrize("path,value,match", [
    ("train.batch_size", 0, r"config.train.batch_size=0: must be an int >= 1"),
    ("train.mode", "crops", r"config.train.mode='crops': must be one of 'crop', 'full_image'"),
    ("optimizer.momentum", 1.0, r"optimizer.momentum=1.0: must be a number in \[0, 1\)"),
    ("data.std", (1.0, 0.0, 1.0), r"data.std=\(1.0, 0.0, 1.0\): must be 3 numbers > 0"),
    ("model.dtype", "float64", r"model.dtype='float64': must be one of"),
    ("model.spp_levels", (4, 0), r"model.spp_levels=\(4, 0\): must be pyramid levels"),
])
def test_a_bad_value_names_the_key_and_what_it_allows(path, value, match):
  c = default_config()
  group, name = path.split(".")
  c[group][name] = value
  with pytest.raises(ConfigError, match=match):
    check_keys(c)


def test_an_unknown_key_is_refused_with_the_nearest_known_one():
  c = default_config()
  c.train.batchsize = 64
  with pytest.raises(ConfigError, match=r"config.train.batchsize: unknown key; did you mean "
                                        r"train.batch_size\?"):
    check_keys(c)
  c = default_config()
  c.eval.views[0].sise = 3
  with pytest.raises(ConfigError, match=r"eval.views\[0\].sise: unknown key; did you mean "
                                        r"eval.views\[0\].size\?"):
    check_keys(c)


def test_view_fields_are_the_schema_view_fields():
  with pytest.raises(ConfigError, match="unknown view field"):
    view("a", "center", crop=3)
  assert view("a", "center", size=5).size == 5
