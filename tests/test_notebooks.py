"""The tutorial notebooks in examples/ run top to bottom (at their CI size) and write their files.

Each notebook is executed with nbclient in a fresh kernel that runs on this interpreter (a
kernelspec written to a temporary folder points at `sys.executable`, so no user-level "python3"
kernelspec can swap in another environment), with `KS_TUTORIAL_SMALL=1` and a temporary working
directory. The notebooks assert their own promises (`preserves_function`, the measured output
difference), so a broken surgery fails the cell that checks it.
"""

import json
import os
import sys
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
KERNEL_NAME = "keras-surgery-tests"
CELL_TIMEOUT = 300  # seconds per cell; at KS_TUTORIAL_SMALL=1 each notebook takes ~15 s

NOTEBOOKS = {
    "01_tabular_features.ipynb": {"tabular_loss_curves.png": "png"},
    "02_agent_surgeries.ipynb": {
        "agent_loss_history.png": "png",
        "agent_surgery_b_regions.png": "png",
        "agent_surgery_b_report.html": "html",
    },
}


@pytest.fixture(scope="module")
def kernel_manager_factory(tmp_path_factory):
    """Makes kernel managers for a kernelspec that runs ipykernel on this interpreter."""
    from ipykernel.kernelspec import write_kernel_spec
    from jupyter_client import KernelManager
    from jupyter_client.kernelspec import KernelSpecManager

    kernels = tmp_path_factory.mktemp("kernels")
    write_kernel_spec(str(kernels / KERNEL_NAME))
    spec = json.loads((kernels / KERNEL_NAME / "kernel.json").read_text())
    assert spec["argv"][0] == sys.executable

    def make():
        specs = KernelSpecManager(kernel_dirs=[str(kernels)], ensure_native_kernel=False)
        return KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs)

    return make


def test_notebooks_have_no_stored_outputs():
    for name in NOTEBOOKS:
        nb = nbformat.read(EXAMPLES / name, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs, f"{name}: clear the outputs before committing"
                assert cell.execution_count is None, f"{name}: clear the execution counts"


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_runs(name, tmp_path, monkeypatch, kernel_manager_factory):
    monkeypatch.setenv("KS_TUTORIAL_SMALL", "1")
    monkeypatch.setenv("KERAS_BACKEND", os.environ.get("KERAS_BACKEND", "tensorflow"))
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
    nb = nbformat.read(EXAMPLES / name, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        km=kernel_manager_factory(),
        timeout=CELL_TIMEOUT,
        startup_timeout=120,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()

    for filename, kind in NOTEBOOKS[name].items():
        path = tmp_path / filename
        assert path.is_file(), f"{name} did not write {filename}"
        data = path.read_bytes()
        if kind == "png":
            assert data.startswith(b"\x89PNG"), f"{filename} is not a PNG"
            assert len(data) > 1024, f"{filename} is only {len(data)} bytes"
        else:
            assert len(data) > 0 and b"<html" in data[:2000].lower(), f"{filename} is empty"
    if name.startswith("02"):
        _check_cli_on_tutorial_files(tmp_path)


def _check_cli_on_tutorial_files(folder: Path) -> None:
    """`keras-surgery diff` and `migrate` on the agent versions the tutorial saved (features
    come from their lineage records); the migrated file loads with Keras and computes v1."""
    import keras
    import numpy as np

    import keras_surgery as ks
    from keras_surgery.cli import main
    from tests.util import max_diff

    v1, v2, out = folder / "agent_v1.keras", folder / "agent_v2.keras", folder / "v1_as_v2.keras"
    assert main(["diff", str(v1), str(v2), "--require-preserve"]) == 0
    assert main(["migrate", str(v1), str(v2), "-o", str(out), "--require-preserve"]) == 0
    old, migrated = keras.saving.load_model(v1), keras.saving.load_model(out)
    old_spec = ks.read_lineage(v1)["features"]
    new_spec = ks.read_lineage(v2)["features"]
    rng = np.random.default_rng(0)
    x_old, x_new = [], []
    for old_in, new_in in zip(old.inputs, migrated.inputs):
        shape = (4,) + tuple(old_in.shape[1:])
        xo = rng.normal(size=shape).astype("float32")
        names_old = _names(old_spec.get(old_in.name), shape[-1])
        names_new = _names(new_spec.get(new_in.name), new_in.shape[-1])
        xn = rng.normal(size=shape[:-1] + (len(names_new),)).astype("float32")
        for j, n in enumerate(names_new):
            if n in names_old:
                xn[..., j] = xo[..., names_old.index(n)]
        x_old.append(xo)
        x_new.append(xn)
    for a, b in zip(keras.tree.flatten(old(x_old)), keras.tree.flatten(migrated(x_new))):
        assert max_diff(a, b) <= 1e-5


def _names(entries, width):
    if entries is None:
        return list(range(width))
    names = []
    for e in entries:
        name, w = (e, 1) if isinstance(e, str) else e
        names += [(name, k) for k in range(w)]
    return names
