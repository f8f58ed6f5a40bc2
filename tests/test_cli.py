"""The keras-surgery command line."""

import json

import keras

from keras_surgery.cli import main
from tests.util import max_diff, predict


def _save(tmp_path, name, n_in, classes, activation=None):
    keras.utils.set_random_seed(len(name))
    x = keras.Input((n_in,), name="x")
    h = keras.layers.Dense(6, activation="relu", name="h")(x)
    y = keras.layers.Dense(classes, activation=activation, name="out")(h)
    path = tmp_path / name
    keras.Model(x, y).save(path)
    return str(path)


def test_diff_prints_a_table_and_json(tmp_path, capsys):
    old = _save(tmp_path, "old.keras", 3, 2)
    new = _save(tmp_path, "new.keras", 4, 2)
    assert main(["diff", old, new]) == 0
    out = capsys.readouterr().out
    assert "preserves_function: True" in out and "partial" in out
    assert main(["diff", old, new, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    kernel = next(w for w in data["weights"] if w["layer"] == "h" and w["role"] == "kernel")
    assert kernel["axes"][0]["index"] == [0, 1, 2, -1]
    assert kernel["zeroed"] == 6


def test_require_preserve_exit_code(tmp_path, capsys):
    old = _save(tmp_path, "old.keras", 3, 2, activation="softmax")
    new = _save(tmp_path, "new.keras", 3, 3, activation="softmax")
    assert main(["diff", old, new]) == 0
    assert main(["diff", old, new, "--require-preserve"]) == 1
    assert "'out'" in capsys.readouterr().out


def test_phi_and_errors(tmp_path, capsys):
    old = _save(tmp_path, "old.keras", 3, 2)
    spec = tmp_path / "features.json"
    spec.write_text(json.dumps({"x": ["a", ("b", 2)]}))
    assert main(["phi", old, "--features", str(spec)]) == 0
    out = capsys.readouterr().out
    assert "x:a -> h/kernel[axis 0: 1]" in out and "x:b -> h/kernel[axis 0: 2]" in out
    assert main(["phi", str(tmp_path / "missing.keras")]) == 2
    assert "No such file" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"x": ["a"]}))
    assert main(["phi", old, "--features", str(bad)]) == 2
    assert "cover 1 column(s)" in capsys.readouterr().err
    assert main([]) == 2


def test_migrate_writes_a_file_keras_loads_and_that_keeps_the_old_function(tmp_path, capsys):
    import numpy as np

    old = _save(tmp_path, "old.keras", 3, 2)
    new = _save(tmp_path, "new.keras", 4, 2)
    out = tmp_path / "out.keras"
    assert main(["migrate", old, new, "-o", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    old_model = keras.saving.load_model(old)
    migrated = keras.saving.load_model(out)
    x = np.random.default_rng(0).normal(size=(5, 3)).astype("float32")
    x4 = np.concatenate([x, np.random.default_rng(1).normal(size=(5, 1))], 1).astype("float32")
    assert max_diff(predict(old_model, x), predict(migrated, x4)) <= 1e-5


def test_migrate_require_preserve_writes_nothing(tmp_path, capsys):
    old = _save(tmp_path, "old.keras", 3, 2, activation="softmax")
    new = _save(tmp_path, "new.keras", 3, 3, activation="softmax")
    out = tmp_path / "out.keras"
    assert main(["migrate", old, new, "-o", str(out), "--require-preserve"]) == 1
    assert not out.exists()
    assert main(["migrate", str(tmp_path / "nope.keras"), new, "-o", str(out)]) == 2


def test_html_and_plot_reports(tmp_path, capsys):
    old = _save(tmp_path, "old.keras", 3, 2)
    new = _save(tmp_path, "new.keras", 4, 2)
    html, png = tmp_path / "report.html", tmp_path / "report.png"
    assert main(["diff", old, new, "--html", str(html), "--plot", str(png)]) == 0
    page = html.read_text()
    assert "<svg" in page and "partial" in page and "preserves_function: <b>True" in page
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


def test_region_map_matches_the_plan():
    import numpy as np

    from keras_surgery.plan import AxisMap, WeightPlan
    from keras_surgery.visual import COPIED, FRESH, ZEROED, region_map

    wp = WeightPlan("d", "kernel", "p", (3, 4), axes=[
        AxisMap("in", np.array([0, -1, 1])), AxisMap("out", np.array([0, 1, -1, 2]))])
    grid = region_map(wp, "preserve")
    expected = np.array([[COPIED, COPIED, FRESH, COPIED],
                         [ZEROED, ZEROED, FRESH, ZEROED],
                         [COPIED, COPIED, FRESH, COPIED]])
    np.testing.assert_array_equal(grid, expected)


def test_verify_command(tmp_path, capsys):
    old = _save(tmp_path, "old.keras", 3, 2)
    assert main(["verify", old]) == 0
    assert "ok" in capsys.readouterr().out.lower()
    assert main(["verify", old, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True


def test_backend_start_up_lines_stay_off_stderr(tmp_path):
    """TensorFlow's C++ start-up lines (absl's and oneDNN's) would bury the command's own
    output; the command imports the backend with them kept off stderr, and errors still
    show."""
    import os
    import subprocess
    import sys

    import pytest

    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    noise = ("absl::InitializeLog", "oneDNN custom operations")
    baseline = subprocess.run([sys.executable, "-c", "import keras"], env=env,
                              capture_output=True, text=True, check=True).stderr
    if not any(line in baseline for line in noise):
        pytest.skip("this backend prints no start-up lines to hide")
    path = _save(tmp_path, "old.keras", 3, 2)
    run = subprocess.run([sys.executable, "-m", "keras_surgery.cli", "phi", path], env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0 and "x:0 -> h/kernel" in run.stdout, run.stdout
    assert not any(line in run.stderr for line in noise), run.stderr
    broken = tmp_path / "broken.keras"
    broken.write_bytes(b"not a zip")
    run = subprocess.run([sys.executable, "-m", "keras_surgery.cli", "phi", str(broken)],
                         env=env, capture_output=True, text=True)
    assert run.returncode == 2 and "broken.keras" in run.stderr, run.stderr


# -- start-up: no Keras for --help, the numpy backend for the commands on files ------------------

_REPORT_BACKEND = (
    "import os, sys\n"
    "from keras_surgery.cli import main\n"
    "for argv in sys.argv[1:]:\n"
    "    rc = main(argv.split('|'))\n"
    "    print('=== rc', rc, flush=True)\n"
    "import keras\n"
    "print('BACKEND', keras.backend.backend(), os.environ.get('KERAS_BACKEND'),\n"
    "      'matplotlib' in sys.modules, file=sys.stderr)\n"
)


def _env_without_backend(**extra):
    import os

    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    env.update(extra)
    return env


def _prepend_path(env, path):
    import os

    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(path), env.get("PYTHONPATH")]))
    return env


def test_help_and_argument_errors_import_no_keras(tmp_path):
    """`--help` and bad arguments work where Keras cannot be imported at all (a built wheel in
    a fresh environment without TensorFlow, JAX or PyTorch); a command that needs Keras there
    says so in one line, exit 2."""
    import subprocess
    import sys

    (tmp_path / "keras").mkdir()
    (tmp_path / "keras" / "__init__.py").write_text(
        "raise ImportError('keras must not be imported here')\n")
    env = _prepend_path(_env_without_backend(), tmp_path)
    cli = [sys.executable, "-m", "keras_surgery.cli"]
    run = subprocess.run(cli + ["--help"], env=env, capture_output=True, text=True)
    assert run.returncode == 0 and "usage: keras-surgery" in run.stdout, run.stderr
    assert all(c in run.stdout for c in ("diff", "migrate", "phi", "verify"))
    run = subprocess.run(cli + ["diff", "--help"], env=env, capture_output=True, text=True)
    assert run.returncode == 0 and "--require-preserve" in run.stdout, run.stderr
    run = subprocess.run(cli + ["diff"], env=env, capture_output=True, text=True)
    assert run.returncode == 2 and "required" in run.stderr and "Traceback" not in run.stderr
    run = subprocess.run(cli + ["phi", str(tmp_path / "m.keras")], env=env, capture_output=True,
                         text=True)
    assert run.returncode == 2, run.stderr
    assert run.stderr.startswith("keras-surgery: error: cannot import Keras"), run.stderr
    assert "keras must not be imported here" in run.stderr and len(
        run.stderr.strip().splitlines()) == 1, run.stderr


def test_file_backend_choice(monkeypatch):
    """diff, migrate and phi get the numpy backend only when the user chose none and Keras is
    not imported yet; verify keeps Keras's own choice."""
    import importlib.util
    import sys

    from keras_surgery import cli

    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object()
                        if name in ("jax", "jaxlib", "scipy") else found(name, *a))
    monkeypatch.delenv("KERAS_BACKEND", raising=False)
    assert cli.file_backend("phi") is None  # Keras is imported in this process already
    monkeypatch.delitem(sys.modules, "keras")
    assert [cli.file_backend(c) for c in ("diff", "migrate", "phi")] == ["numpy"] * 3
    assert cli.file_backend("verify") is None and cli.file_backend(None) is None
    monkeypatch.setenv("KERAS_BACKEND", "")  # empty: unset, for Keras too
    assert cli.file_backend("diff") == "numpy"
    for user_choice in ("tensorflow", "jax", "torch", "numpy"):
        monkeypatch.setenv("KERAS_BACKEND", user_choice)
        assert cli.file_backend("diff") is None
    monkeypatch.delenv("KERAS_BACKEND")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None
                        if name == "jax" else object())
    assert cli.file_backend("diff") is None  # the numpy backend imports JAX


def test_file_backend_import_keeps_out_what_it_does_not_need_and_falls_back(tmp_path):
    """The file backend is imported with KERAS_BACKEND set for the import only and the optional
    modules Keras would import for nothing kept out; if it fails to import, Keras is imported
    again, as the environment says, with those modules back. Run on a stand-in `keras`."""
    import subprocess
    import sys

    for name in ("jax", "jaxlib", "scipy", "requests"):
        (tmp_path / f"{name}.py").write_text("OK = True\n")
    (tmp_path / "keras").mkdir()
    (tmp_path / "keras" / "first.py").write_text("")
    (tmp_path / "keras" / "__init__.py").write_text(
        "import os\n"
        "import keras.first  # left in sys.modules if the import below fails\n"
        "try:\n"
        "    import requests  # noqa: F401\n"
        "    OPTIONAL = True\n"
        "except ImportError:\n"
        "    OPTIONAL = False\n"
        "BACKEND = os.environ.get('KERAS_BACKEND')\n"
        "if BACKEND == 'numpy' and os.environ.get('NUMPY_BACKEND_BROKEN'):\n"
        "    raise ImportError('no numpy backend here')\n"
    )
    code = ("import os, sys\n"
            "from keras_surgery import cli\n"
            "cli._import_keras(sys.argv[1])\n"
            "import keras, requests\n"
            "print(keras.BACKEND, keras.OPTIONAL, os.environ.get('KERAS_BACKEND'), requests.OK)\n")

    def imported(command, **env):
        run = subprocess.run([sys.executable, "-c", code, command], capture_output=True,
                             text=True, env=_prepend_path(_env_without_backend(**env), tmp_path))
        assert run.returncode == 0, run.stderr
        return run.stdout.split()

    assert imported("phi") == ["numpy", "False", "None", "True"]
    assert imported("diff", NUMPY_BACKEND_BROKEN="1") == ["None", "True", "None", "True"]
    assert imported("verify") == ["None", "True", "None", "True"]
    assert imported("migrate", KERAS_BACKEND="torch") == ["torch", "True", "torch", "True"]


def test_file_commands_run_on_numpy_with_the_same_output(tmp_path):
    """With KERAS_BACKEND unset, diff and phi run on Keras's numpy backend and print exactly
    what they print on this run's backend, which a KERAS_BACKEND set by the user keeps; migrate
    writes the same file contents."""
    import importlib.util
    import subprocess
    import sys
    import zipfile

    import pytest

    if any(importlib.util.find_spec(n) is None for n in ("jax", "jaxlib", "scipy")):
        pytest.skip("Keras's numpy backend needs JAX and SciPy")
    backend = keras.backend.backend()
    old = _save(tmp_path, "old.keras", 3, 2)
    new = _save(tmp_path, "new.keras", 4, 2)
    spec = tmp_path / "features.json"
    spec.write_text(json.dumps({"x": ["a", ("b", 2)]}))
    outputs, written = {}, {}
    for name, env in (("numpy", _env_without_backend()),
                      (backend, _env_without_backend(KERAS_BACKEND=backend))):
        out = tmp_path / f"out_{name}.keras"
        commands = [f"diff|{old}|{new}|--json", f"phi|{old}|--features|{spec}",
                    f"migrate|{old}|{new}|-o|{out}"]
        run = subprocess.run([sys.executable, "-c", _REPORT_BACKEND, *commands], env=env,
                             capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        assert run.stdout.count("=== rc 0") == 3, run.stdout
        reported = [ln.split() for ln in run.stderr.splitlines() if ln.startswith("BACKEND ")]
        assert len(reported) == 1, run.stderr
        # KERAS_BACKEND is put back as it was; the file backend's Keras came without matplotlib
        assert reported[0][1:3] == [name, "None" if name == "numpy" else backend], run.stderr
        assert name != "numpy" or reported[0][3] == "False", run.stderr
        outputs[name] = run.stdout.replace(str(out), "OUT")
        with zipfile.ZipFile(out) as z:
            written[name] = {n: z.read(n) for n in z.namelist()}
    assert outputs["numpy"] == outputs[backend]
    assert '"preserves_function": true' in outputs["numpy"] and "x:b -> h/kernel" in outputs[
        "numpy"]
    assert written["numpy"] == written[backend]


def test_migrate_with_output_specs_moves_the_classes(tmp_path, capsys):
    import numpy as np

    old = _save(tmp_path, "old.keras", 3, 2)
    new = _save(tmp_path, "new.keras", 3, 3)
    old_spec, new_spec = tmp_path / "old_outputs.json", tmp_path / "new_outputs.json"
    old_spec.write_text(json.dumps({"out": ["cat", "dog"]}))
    new_spec.write_text(json.dumps({"out": ["dog", "fox", "cat"]}))
    out = tmp_path / "out.keras"
    assert main(["migrate", old, new, "-o", str(out), "--old-outputs", str(old_spec),
                 "--new-outputs", str(new_spec), "--require-preserve"]) == 0
    assert "classes of output 'out'" in capsys.readouterr().out
    old_model, migrated = keras.saving.load_model(old), keras.saving.load_model(out)
    x = np.random.default_rng(0).normal(size=(5, 3)).astype("float32")
    old_y, new_y = predict(old_model, x), predict(migrated, x)
    assert max_diff(new_y[:, [2, 0]], old_y) <= 8 * np.finfo(np.float32).eps * max(
        1.0, float(np.abs(old_y).max()))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["diff", old, new, "--old-outputs", str(bad), "--new-outputs", str(bad)]) == 2
    assert "Cannot read output spec" in capsys.readouterr().err


def test_policy_choices_are_the_engines_policies(tmp_path, capsys):
    """The command line lists the policies without importing the engine (`--help` imports no
    Keras): the list must stay the engine's, and `--policy duplicate` must reach it."""
    from keras_surgery import cli
    from keras_surgery.plan import POLICIES

    assert tuple(cli.POLICY_CHOICES) == tuple(POLICIES)
    old, new = str(tmp_path / "old.keras"), str(tmp_path / "new.keras")
    x = keras.Input((3,), name="x")
    keras.Model(x, keras.layers.Dense(2, name="out")(keras.layers.Dense(4, name="h")(x))).save(old)
    x = keras.Input((3,), name="x")
    keras.Model(x, keras.layers.Dense(2, name="out")(keras.layers.Dense(8, name="h")(x))).save(new)
    assert main(["diff", old, new, "--policy", "duplicate"]) == 0, capsys.readouterr()
