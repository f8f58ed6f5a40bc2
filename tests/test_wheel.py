"""The built wheel installs and works in a fresh virtual environment that has no backend.

The sdist is built from a copy of the source tree and the wheel from the sdist (PEP 517,
`python -m build`, as `make dist` does), and twine checks their metadata. A new virtual
environment (no system site-packages) gets the wheel with its requirements from the package
index and no extra: no TensorFlow, JAX or PyTorch may come with it, and `keras-surgery --help`
must work there. Keras cannot run without one of those (its numpy backend imports JAX too), so
the `jax` extra is added next, and the quick start and a command-line migration run end to end
in that environment, on the installed package, not on the source tree.

Versions are held to constraints.txt, as in `make install`; nothing is kept between runs. It
takes about a minute and a half on 2 busy cores (the build, then Keras starting on JAX), and
runs once, in the TensorFlow pass of `make test`: what it checks does not depend on the
backend of the process running the suite.
"""

import configparser
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("build")

ROOT = Path(__file__).resolve().parent.parent
CONSTRAINTS = ROOT / "constraints.txt"
BACKEND_PACKAGES = {"tensorflow", "tensorflow-cpu", "tensorflow-intel", "tensorflow-macos",
                    "tf-keras", "jax", "jaxlib", "torch"}
# Not copied into the build tree: environments, caches and earlier build output.
NOT_SOURCES = shutil.ignore_patterns(".git", ".venv", "venv", "dist", "build", "*.egg-info",
                                     "__pycache__", ".pytest_cache", ".ruff_cache",
                                     ".hypothesis", "*.keras")

pytestmark = pytest.mark.skipif(
    os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow",
    reason="backend-independent (the wheel is tested in a venv of its own): runs once, in the "
           "TensorFlow pass",
)

MAKE_FILES = """
import json, keras, numpy as np
def build(names, hidden):
    x = keras.Input((len(names),), name="features")
    h = keras.layers.Dense(hidden, activation="relu", name="hidden")(x)
    return keras.Model(x, keras.layers.Dense(1, name="out")(h))
old_names, new_names = ["a", "b", "c"], ["c", "new", "a", "b"]
keras.utils.set_random_seed(0)
old, new = build(old_names, 8), build(new_names, 12)
old.save("old.keras")
new.save("new.keras")
for name, names in (("old", old_names), ("new", new_names)):
    with open(name + ".json", "w") as f:
        json.dump({"features": names}, f)
x_new = np.random.default_rng(0).normal(size=(16, 4)).astype("float32")
x_old = x_new[:, [2, 3, 0]]
np.savez("expected.npz", x_new=x_new, y=keras.ops.convert_to_numpy(old(x_old)))
"""

# Then, in the same process (one start of Keras fewer): the quick start, from the venv.
CHECK_AND_QUICKSTART = """
import runpy, sys, keras, numpy as np, keras_surgery
assert keras_surgery.__file__.startswith(sys.argv[1]), keras_surgery.__file__
data = np.load("expected.npz")
y = keras.ops.convert_to_numpy(keras.saving.load_model("out.keras")(data["x_new"]))
diff = float(np.max(np.abs(y - data["y"])))
assert diff <= 1e-5, diff
print("max diff", diff)
runpy.run_path(sys.argv[2], run_name="__main__")
"""


def _run(args, env, cwd, timeout=600):
    result = subprocess.run([str(a) for a in args], env=env, cwd=cwd, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, (
        f"{' '.join(map(str, args))} exited {result.returncode}\n"
        f"--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}"
    )
    return result.stdout


def _installed(python, env, cwd):
    names = _run([python, "-c", "import importlib.metadata as m; "
                  "print(*sorted({d.metadata['Name'] for d in m.distributions()}))"], env, cwd)
    return {name.lower().replace("_", "-") for name in names.split()}


def _version():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return cfg["metadata"]["version"]


def test_wheel_installs_without_backend_and_runs(tmp_path):
    # A clean environment: nothing from this venv, the user's site or the suite's backend.
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "KERAS_BACKEND")}
    env.update(PYTHONNOUSERSITE="1", TMPDIR=str(tmp_path), TF_CPP_MIN_LOG_LEVEL="3",
               KERAS_HOME=str(tmp_path / "keras-home"))
    # The venv's own processes cache the bytecode of what they import (in the temporary venv).
    venv_env = {k: v for k, v in env.items() if k != "PYTHONDONTWRITEBYTECODE"}
    work = tmp_path / "work"
    work.mkdir()

    # Build: sdist from a copy of the tree, the wheel from the sdist, metadata checked.
    src, dist = tmp_path / "src", tmp_path / "dist"
    shutil.copytree(ROOT, src, ignore=NOT_SOURCES)
    build_env = dict(env, PIP_CONSTRAINT=str(CONSTRAINTS))
    _run([sys.executable, "-m", "build", "--quiet", "--outdir", dist, src], build_env, work)
    wheels, sdists = sorted(dist.glob("*.whl")), sorted(dist.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(p.name for p in dist.iterdir())
    wheel = wheels[0]
    assert wheel.name == f"keras_surgery-{_version()}-py3-none-any.whl"
    _run([sys.executable, "-m", "twine", "check", "--strict", wheel, sdists[0]], env, work)
    # The licence setup.cfg declares travels with both.
    with zipfile.ZipFile(wheel) as whl:
        licences = [n for n in whl.namelist() if ".dist-info/" in n and n.endswith("/LICENSE")]
        assert licences and b"Apache License" in whl.read(licences[0]), whl.namelist()
    with tarfile.open(sdists[0]) as sdist:
        assert any(n.endswith("/LICENSE") for n in sdist.getnames()), sdist.getnames()

    # A fresh venv (no system site-packages) with the wheel and its requirements only. This
    # suite's pip installs into it (`--python`): no pip of its own to set up. Modules are
    # compiled when first imported, not all at install.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], env, work)
    assert "include-system-site-packages = false" in (venv / "pyvenv.cfg").read_text()
    python, bindir = venv / "bin" / "python", venv / "bin"
    pip = [sys.executable, "-m", "pip", "--python", python]
    install = [*pip, "install", "--quiet", "--no-compile", "-c", CONSTRAINTS]
    _run([*install, wheel], env, work)
    installed = _installed(python, venv_env, work)
    assert {"keras-surgery", "keras", "numpy", "h5py"} <= installed, installed
    assert not BACKEND_PACKAGES & installed, f"a backend came with the wheel: {installed}"
    _run([*pip, "check"], env, work)

    # The package imports and the command line prints its help without any backend.
    where = _run([python, "-c", "import sys, keras_surgery as ks; "
                  "assert 'keras' not in sys.modules; print(ks.__version__, ks.__file__)"],
                 venv_env, work).split()
    assert where[0] == _version()
    assert Path(where[1]).is_relative_to(venv), where
    usage = _run([bindir / "keras-surgery", "--help"], venv_env, work)
    assert usage.startswith("usage: keras-surgery")
    for command in ("diff", "migrate", "phi", "verify"):
        assert command in usage

    # With the jax extra (no other backend comes with it): `keras-surgery migrate` between two
    # saved files, whose output computes the old function, then the quick start end to end.
    _run([*install, f"{wheel}[jax]"], env, work)
    installed = _installed(python, venv_env, work)
    assert {"jax", "jaxlib"} <= installed, installed
    assert not (BACKEND_PACKAGES - {"jax", "jaxlib"}) & installed, installed
    jax_env = dict(venv_env, KERAS_BACKEND="jax")
    _run([python, "-c", MAKE_FILES], jax_env, work)
    out = _run([bindir / "keras-surgery", "migrate", "old.keras", "new.keras", "-o", "out.keras",
                "--old-features", "old.json", "--new-features", "new.json",
                "--require-preserve"], jax_env, work)
    assert "wrote out.keras" in out, out
    out = _run([python, "-c", CHECK_AND_QUICKSTART, venv, ROOT / "examples" / "quickstart.py"],
               jax_env, work)
    assert "preserves_function=True" in out, out
