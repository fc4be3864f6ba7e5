"""sample.ipynb, the README's cells: run top to bottom by a real IPython kernel (nbclient, ipykernel) started in a
copy of the repository's folder, no cell may fail and each cell that plots shows its image inline; the README's
cell is the notebook's first; the notebook as committed holds its outputs.

After a change to a cell, refill the saved outputs from the shipped weights, pretrained/shapes (one to two minutes
on a 2-core CPU):

    python tests/test_notebook.py

It runs the notebook as the test does (in a copy of this folder with no models/, so the first cell loads
pretrained/shapes) and writes the cells and their outputs into sample.ipynb, the progress bars left out."""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "sample.ipynb"
PRETRAINED = REPO / "pretrained" / "shapes"
TINY = ["--num_images", "48", "--img_size", "16", "--width", "8", "--batch_size", "16", "--sample_steps", "2",
        "--ema_start", "2", "--amp", "False", "--device", "cpu", "--epochs", "1"]  # as tests/test_train.py's
NO_ATTRIBUTES_RUN = "no run in models/celeba"  # what the attributes cell says without that run


def source(cell):
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def code_cells(notebook):
    return [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]


def readme_cells():
    return re.findall(r"<!-- notebook cell -->\s*```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)


def shows(cell, mime):
    return any(mime in output.get("data", {}) for output in cell["outputs"]
               if output["output_type"] in ("display_data", "execute_result"))


def printed(cell):
    return "".join(source({"source": output.get("text", "")}) for output in cell["outputs"]
                   if output["output_type"] == "stream" and output["name"] == "stdout")


def check_outputs(notebook):
    """Every cell ran, in order, without an error; every cell that calls plot_images shows a PNG (the attributes
    cell: or says it has no run), the GIF cell shows the GIF."""
    cells = code_cells(notebook)
    assert [cell["execution_count"] for cell in cells] == list(range(1, len(cells) + 1))
    for cell in cells:
        text = source(cell)
        assert not [output for output in cell["outputs"] if output["output_type"] == "error"], text
        if "plot_images(" in text and not ("attributes" in cell["metadata"].get("tags", [])
                                           and NO_ATTRIBUTES_RUN in printed(cell)):
            assert shows(cell, "image/png"), f"no image shown by the cell\n{text}"
        if "save_frames_gif(" in text:
            assert shows(cell, "image/gif"), f"no GIF shown by the cell\n{text}"


def repo_folder(folder, pretrained, steps=None):
    """A copy of the repository's folder as a user has it, less models/: its scripts, pretrained/shapes (a link
    to `pretrained`) and the notebook; `steps`: each sampling call's steps made that few, RePaint's resampling 1."""
    for path in REPO.glob("*.py"):
        shutil.copy(path, folder)
    (folder / "pretrained").mkdir()
    (folder / "pretrained" / "shapes").symlink_to(pretrained, target_is_directory=True)
    notebook = json.loads(NOTEBOOK.read_text())
    for cell in code_cells(notebook) if steps else []:
        fewer = re.sub(r"\bsteps=\d+", f"steps={steps}", source(cell))
        cell["source"] = re.sub(r"\bresample=\d+", "resample=1", fewer)
    (folder / NOTEBOOK.name).write_text(json.dumps(notebook))
    return folder / NOTEBOOK.name


def execute(path):
    """Run the notebook at `path` top to bottom in a new IPython kernel started in its folder (as Jupyter starts
    it), matplotlib's inline backend showing the figures; the first cell error stops it (CellExecutionError)."""
    import nbclient
    import nbformat
    notebook = nbformat.read(path, as_version=4)
    backend = os.environ.pop("MPLBACKEND", None)  # (Agg, where set, would show nothing)
    try:
        nbclient.NotebookClient(notebook, kernel_name="python3", timeout=600, record_timing=False,
                                resources={"metadata": {"path": str(path.parent)}}).execute()
    finally:
        if backend is not None:
            os.environ["MPLBACKEND"] = backend
    return notebook


def tiny_run(folder):
    """A stand-in for pretrained/shapes where it is not shipped: a tiny conditional run of the built-in shapes."""
    subprocess.run([sys.executable, str(REPO / "ddpm_conditional.py"), *TINY], cwd=folder, check=True,
                   capture_output=True)
    return folder / "models" / "DDPM_conditional"


def test_the_readme_cell_is_the_notebooks_first():
    """One source of truth: the README shows the notebook's first cell, as it is in the notebook."""
    notebook = json.loads(NOTEBOOK.read_text())
    assert readme_cells() == [source(code_cells(notebook)[0]) + "\n"]


def test_the_notebook_runs_in_a_kernel_and_shows_each_image(tmp_path):
    """sample.ipynb run by a real IPython kernel in a copy of the repository's folder (no models/ there: the first
    cell loads pretrained/shapes, or a tiny stand-in where that is not shipped yet), 4 steps a sampling call: no
    cell fails, each image is shown inline, the GIF is written and shown; no models/celeba: the attributes cell says
    so."""
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    (tmp_path / "repo").mkdir()
    (tmp_path / "run").mkdir()
    pretrained = PRETRAINED if (PRETRAINED / "ema_ckpt.pt").exists() else tiny_run(tmp_path / "run")
    notebook = execute(repo_folder(tmp_path / "repo", pretrained, steps=4))  # 4, not 20 to 250: seconds, not minutes
    check_outputs(notebook)
    cells = code_cells(notebook)
    assert NO_ATTRIBUTES_RUN in printed(cells[-1]) and not shows(cells[-1], "image/png")
    assert (tmp_path / "repo" / "denoising.gif").exists() and not (tmp_path / "repo" / "samples.png").exists()


def test_the_committed_notebook_holds_its_outputs():
    """sample.ipynb reads on a code host without running: its saved outputs are those of one run, in order, with
    each image (refilled by `python tests/test_notebook.py`)."""
    if not (PRETRAINED / "ema_ckpt.pt").exists():
        pytest.skip("the saved outputs come from pretrained/shapes, not shipped yet")
    check_outputs(json.loads(NOTEBOOK.read_text()))


def is_progress_bar(output):
    """tqdm's bars on stderr: lines rewritten in place (\\r), which a code host shows all at once."""
    text = source({"source": output.get("text", "")})
    return output["output_type"] == "stream" and output["name"] == "stderr" and text.startswith("\r")


def fill():
    """Write into sample.ipynb the outputs of a run of it from pretrained/shapes (the module's docstring)."""
    import nbformat
    if not (PRETRAINED / "ema_ckpt.pt").exists():
        sys.exit(f"no {PRETRAINED / 'ema_ckpt.pt'}: the saved outputs come from the shipped weights")
    with tempfile.TemporaryDirectory() as folder:
        notebook = execute(repo_folder(Path(folder), PRETRAINED))
    for cell in code_cells(notebook):
        cell["outputs"] = [output for output in cell["outputs"] if not is_progress_bar(output)]
    check_outputs(notebook)
    nbformat.write(notebook, NOTEBOOK)
    print(f"{NOTEBOOK}: {NOTEBOOK.stat().st_size // 1024} KiB")


if __name__ == "__main__":
    fill()
