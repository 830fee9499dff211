"""The Colab notebook runs top to bottom on a CPU with a tiny override, so it never rots."""

import os

import nbformat
import pytest

nbclient = pytest.importorskip("nbclient")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "experiments", "notebooks", "spp_imagenette_colab.ipynb")


@pytest.mark.slow
def test_colab_notebook_runs_on_cpu(tmp_path):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
  nb.cells.insert(index + 1, nbformat.v4.new_code_cell(
      f"INSTALL = False\nREPO_DIR = {REPO!r}\nDATA_DIR = {str(tmp_path / 'tfds')!r}\n"
      f"WORKDIR = {str(tmp_path / 'work')!r}\nCONFIG_ARG = 'multi,tiny'\n"
      "import matplotlib\nmatplotlib.use('Agg')"))
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()
  outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                    for o in c.get("outputs", []))
  assert "centre crop top-1" in outputs and "full image top-1" in outputs
  assert os.path.exists(tmp_path / "work" / "results.json")
