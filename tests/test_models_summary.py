"""Tests of spp_jax.summary: parameter counts pinned to the layer specs of the paper's networks."""

from __future__ import annotations

import pytest

from spp_jax import summary


def conv(k, c_in, c_out):
  return k * k * c_in * c_out + c_out


def fc(d_in, d_out):
  return d_in * d_out + d_out


def test_zf5_counts_and_shapes_at_224():
  rows = {r.name: r for r in summary.summarize("zf5", 224)}
  expected = {
      "conv1": conv(7, 3, 96), "conv2": conv(5, 96, 256), "conv3": conv(3, 256, 384),
      "conv4": conv(3, 384, 384), "conv5": conv(3, 384, 256),
      "fc6": fc(12800, 4096), "fc7": fc(4096, 4096), "classifier": fc(4096, 1000),
      "norm1": 0, "pool1": 0, "norm2": 0, "pool2": 0, "spp": 0,
  }
  assert {n: r.num_params for n, r in rows.items()} == expected
  # fc6 of ZF-5 with (6, 3, 2, 1): 50 bins x 256 channels = 12,800 inputs.
  assert dict(rows["fc6"].param_shapes)["kernel"] == (12_800, 4_096)
  assert rows["conv1"].output_shape == (1, 110, 110, 96)
  assert rows["pool1"].output_shape == (1, 55, 55, 96)
  assert rows["conv2"].output_shape == (1, 26, 26, 256)
  assert rows["conv5"].output_shape == (1, 13, 13, 256)
  assert rows["spp"].output_shape == (1, 12_800)
  assert rows["classifier"].output_shape == (1, 1000)


def test_zf5_at_180_and_fixed_head():
  rows = {r.name: r for r in summary.summarize("zf5", 180, batch_size=4)}
  assert rows["conv5"].output_shape == (4, 10, 10, 256)
  assert rows["spp"].output_shape == (4, 12_800)  # the same length at every size
  fixed = {r.name: r for r in summary.summarize("zf5", 224, head="fixed", num_classes=10)}
  assert fixed["pool"].output_shape == (1, 6 * 6 * 256)
  assert fixed["fc6"].num_params == fc(9216, 4096)
  assert fixed["classifier"].num_params == fc(4096, 10)


def test_overfeat7_counts():
  rows = {r.name: r for r in summary.summarize("overfeat7", 224)}
  assert rows["conv2"].num_params == conv(5, 96, 256)
  assert rows["conv3"].num_params == conv(3, 256, 512)
  for name in ("conv4", "conv5", "conv6", "conv7"):
    assert rows[name].num_params == conv(3, 512, 512)
    assert rows[name].output_shape == (1, 18, 18, 512)
  assert rows["fc6"].num_params == fc(512 * 50, 4096)


def test_width_multiplier_and_rectangular_input():
  rows = {r.name: r for r in summary.summarize("convnet5", (160, 200), width_multiplier=0.25,
                                               fc_width=64, spp_levels=(4, 2, 1))}
  assert rows["conv1"].num_params == conv(11, 3, 24)
  assert rows["conv5"].output_shape == (1, 9, 12, 64)
  assert rows["fc6"].num_params == fc(64 * 21, 64)


def test_too_small_input_raises():
  with pytest.raises(ValueError, match="at least 39"):
    summary.summarize("zf5", 38)


def test_command_prints_the_table(capsys):
  assert summary.main(["--model", "zf5", "--size", "224"]) == 0
  out = capsys.readouterr().out
  assert "fc6" in out and "52,432,896" in out and "(1, 13, 13, 256)" in out
  total = (conv(7, 3, 96) + conv(5, 96, 256) + conv(3, 256, 384) + conv(3, 384, 384)
           + conv(3, 384, 256) + fc(12800, 4096) + fc(4096, 4096) + fc(4096, 1000))
  assert f"{total:,}" in out
  assert summary.main(["--model", "zf5", "--size", "100", "--head", "fixed"]) == 2
  assert "accepts only 224x224" in capsys.readouterr().err
