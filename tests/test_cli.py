"""The keras-surgery command line."""

import json

import keras

from keras_surgery.cli import main


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
    assert np.abs(np.asarray(old_model(x)) - np.asarray(migrated(x4))).max() <= 1e-5


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
