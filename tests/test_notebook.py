"""Runs notebooks/colab_tpu.ipynb end to end on the CPU, offline: 8 host devices stand in
for the TPU cores, the parameters cell is overridden (papermill style: a cell injected after
the one tagged `parameters`) to skip the install, convert a randomly initialised timm
volo_d1_224 saved as .safetensors, classify a local image and train a few steps."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

from tests.support import REPO

# The test's inputs (timm weights, a sample image) and the notebook runner; all are in the
# test extra.
pytest.importorskip("timm", reason="needs timm (and torch) to make the .safetensors weights")
pytest.importorskip("safetensors")
pytest.importorskip("skimage", reason="needs scikit-image for the sample image")
pytest.importorskip("ipykernel", reason="needs ipykernel to run the notebook")
nbformat = pytest.importorskip("nbformat", reason="needs nbformat to run the notebook")
nbclient = pytest.importorskip("nbclient", reason="needs nbclient to run the notebook")

NOTEBOOK = REPO / "notebooks" / "colab_tpu.ipynb"
DEVICES = 8

# A `!command` that exits non-zero raises (IPython only records it in `_exit_code`), so a
# failing step fails the test at its cell.
STRICT_SHELL = """
_ip = get_ipython()
_system = _ip.system


def _checked_system(cmd):
    _system(cmd)
    if _ip.user_ns.get("_exit_code"):
        raise RuntimeError(f"exit code {_ip.user_ns['_exit_code']}: !{cmd}")


_ip.system = _checked_system
"""


def _inputs(tmp_path: Path) -> tuple[Path, Path]:
    import timm
    from PIL import Image
    from safetensors.torch import save_file
    from skimage import data

    model = timm.create_model("volo_d1_224", pretrained=False)
    weights = tmp_path / "volo_d1_224.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    image = tmp_path / "chelsea.jpg"
    Image.fromarray(data.chelsea()).save(image)
    return weights, image


def _text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream":
            parts.append(out["text"])
        elif out["output_type"] == "error":
            parts.append("\n".join(out["traceback"]))
    return "".join(parts).replace("\r\n", "\n")  # `!` output comes through a pty


def _cell(nb, snippet: str):
    """The one code cell whose source contains `snippet`."""
    (cell,) = [c for c in nb.cells if c.cell_type == "code" and snippet in c.source]
    return cell


# About 6 minutes on the 2-core CI machine (a kernel, a conversion, training on 8 CPU
# devices): run it with -m slow.
@pytest.mark.slow
def test_colab_notebook_runs_offline_on_cpu(tmp_path, monkeypatch):
    weights_src, image = _inputs(tmp_path)
    work = tmp_path / "work"
    work.mkdir()

    nb = nbformat.read(NOTEBOOK, as_version=4)
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    overrides = (
        "# Injected by tests/test_notebook.py\n"
        f"INSTALL = False\nWORK = {str(work)!r}\nWEIGHTS_SRC = {str(weights_src)!r}\n"
        f"IMAGE = {str(image)!r}\nMAX_STEPS = 4\n"
        # The TensorBoard extension loads; its server is not started (it would outlive the test).
        "TENSORBOARD = False\n" + STRICT_SHELL
    )
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(overrides))

    # The kernel and its `!python` subprocesses: this interpreter, the checkout, 8 CPU devices.
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv(
        "XLA_FLAGS",
        f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={DEVICES}",
    )
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}
    )
    client.execute()  # raises CellExecutionError on the first failing cell

    for cell in nb.cells:
        assert "Traceback" not in _text(cell), _text(cell)

    assert "%tensorboard --logdir {WORK}/runs" in _cell(nb, "%load_ext tensorboard").source

    devices = _text(_cell(nb, '!python -c "import jax'))
    assert "cpu" in devices and f"id={DEVICES - 1})" in devices, devices

    convert = _text(_cell(nb, "-m volo_jax.convert"))
    assert "wrote volo_d1_224 (26,632,040 parameters)" in convert, convert
    assert (work / "weights" / "volo_d1_224.safetensors").is_file()

    predicted = _text(_cell(nb, "-m volo_jax.predict"))
    top = [ln for ln in predicted.splitlines() if re.fullmatch(r"\s*\d+\.\d\d%  \S.*", ln)]
    assert len(top) == 5, predicted

    runs = {"digits_dp": "'data': 8, 'fsdp': 1", "digits_fsdp": "'data': 1, 'fsdp': 8"}
    for run, mesh in runs.items():
        out = _text(_cell(nb, f"--workdir={{WORK}}/runs/{run} "))
        assert f"mesh {{{mesh}, 'model': 1}}" in out, out
        assert f"on {DEVICES} devices" in out and "step 4: eval top-1" in out, out
        for name in ("curves.png", "metrics.jsonl", "weights"):
            assert (work / "runs" / run / name).exists(), name

    memory = _text(_cell(nb, "!python -m benchmarks.sharding_memory"))
    assert f"1 x {DEVICES} x 1 ({DEVICES} cpu devices)" in memory, memory
    assert re.search(r"^\s+replicated\s+fsdp$", memory, re.M), memory
    rows = {
        ln.split()[0]: [float(v) for v in ln.split()[1:]]
        for ln in memory.splitlines()
        if re.fullmatch(r"\w+(\s+[\d.]+){2}", ln.strip())
    }
    replicated, fsdp = rows["params"]
    assert fsdp == pytest.approx(replicated / DEVICES, rel=0.05), memory
    assert rows["opt_state"][1] < rows["opt_state"][0] / 4, memory

    curves = nb.cells[-1]
    assert any("image/png" in out.get("data", {}) for out in curves.outputs), curves.outputs


def test_install_stops_with_an_error_naming_repo_url_while_it_is_empty(tmp_path):
    # The parameters cell and the install cell, as Colab runs them before anything is set:
    # no clone, no zip, so nothing to install from.
    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    install = _cell(nb, "runtime_requirements.py")
    assert 'REPO_URL = ""' in params.source and "REQUIRED" in params.source
    zip_path = tmp_path / "volo-jax.zip"  # not there
    cells = [
        nbformat.v4.new_code_cell(params.source),
        nbformat.v4.new_code_cell(
            install.source.replace('"/content/volo-jax.zip"', repr(str(zip_path)))
        ),
    ]
    client = nbclient.NotebookClient(
        nbformat.v4.new_notebook(cells=cells), timeout=120, kernel_name="python3"
    )
    with pytest.raises(nbclient.exceptions.CellExecutionError, match="REPO_URL is empty"):
        client.execute()
