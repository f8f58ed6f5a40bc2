"""The gradient verifier on JAX and PyTorch gives TensorFlow's answers on the same models.

Keras fixes its backend per process, so tests/backend_probe_script.py runs once per backend in a
child process: `verify_mapping` on the same models (an MLP with named features, a sigmoid, batch
normalisation, a conv net with named channels, an Embedding beside a Concatenate, an LSTM and a
GRU, a shared encoder, attention, and two layers registered with a wrong rule) and
`migrate_weights(old, new, verify=True)` on a live old model. TensorFlow's tf.GradientTape probe
is the oracle: JAX's and PyTorch's results must equal it, and the gradients they were
thresholded from must agree to float32 round-off.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

# The children run every backend whatever this run's backend is: once, in the TensorFlow run.
pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="compares all three backends in child processes; run once, in the TensorFlow run",
)

SCRIPT = Path(__file__).with_name("backend_probe_script.py")
ROOT = SCRIPT.parent.parent
OTHERS = ("jax", "torch")
PROBES = {"tensorflow": "TensorFlowProbe", "jax": "JaxProbe", "torch": "TorchProbe"}
# The deepest path (attention's softmax, a layer normalisation) measured 20 float32 epsilons of
# the largest reduced gradient on this machine; 128 leaves room for another CPU's kernels.
GRADIENT_RTOL = 128 * float(np.finfo(np.float32).eps)
TIMEOUT = 300


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Backend -> what the script wrote. All three children run at once: each spends most of
    its time importing and compiling, and the wall time of the file is what CI pays."""
    out = tmp_path_factory.mktemp("backends")
    children = {}
    for backend in ("tensorflow",) + OTHERS:
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
        path = out / f"{backend}.json"
        children[backend] = (path, subprocess.Popen(
            [sys.executable, str(SCRIPT), str(path)], cwd=ROOT, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))
    found = {}
    for backend, (path, child) in children.items():
        try:
            log, _ = child.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            child.kill()
            log, _ = child.communicate()
        assert child.returncode == 0, f"{backend} child failed:\n{log[-6000:]}"
        found[backend] = json.loads(path.read_text())
    return found


def _available(results, backend):
    if "unavailable" in results[backend]:
        pytest.skip(results[backend]["unavailable"])
    return results[backend]


def test_tensorflow_reference_has_real_content(results):
    tf = _available(results, "tensorflow")
    assert tf["probe"] == "TensorFlowProbe"
    cases = tf["cases"]
    wrong = {"reverse_as_passthrough", "mix_as_passthrough"}
    for name, case in cases.items():
        assert case["checked"] > 0 and case["features"], name
        assert case["ok"] is (name not in wrong), (name, case["mismatches"])
    # the wrong rules are found, on the exact rows (see tests/test_verify.py)
    reverse = {(tuple(m["feature"]), m["path"]): (m["only_symbolic"], m["only_gradient"])
               for m in cases["reverse_as_passthrough"]["mismatches"]}
    assert reverse == {(("obs", k), "dense/kernel"): ([k], [4 - k]) for k in (0, 1, 3, 4)}
    assert len(cases["mix_as_passthrough"]["mismatches"]) == 5
    assert all(m["only_gradient"] for m in cases["mix_as_passthrough"]["mismatches"])
    # what cannot be probed is said, not counted
    unverified = {(u["path"], tuple(u["feature"] or ())) for u in
                  cases["embedding_concat"]["unverified"]}
    assert ("emb/embeddings", ()) in unverified and (None, ("tokens", 0)) in unverified
    assert {u["path"] for u in cases["batch_norm"]["unverified"]} == {"bn/beta", "bn/moving_mean"}
    assert cases["sigmoid_mlp"]["notes"] and "'head/kernel'" in cases["sigmoid_mlp"]["notes"][0]
    assert cases["mlp"]["features"] == [["obs", "hp"], ["obs", "pos"], ["obs", "mana"]]


@pytest.mark.parametrize("backend", OTHERS)
def test_results_equal_tensorflows(results, backend):
    other = _available(results, backend)
    tf = _available(results, "tensorflow")
    assert other["probe"] == PROBES[backend]
    assert other["cases"].keys() == tf["cases"].keys()
    for name, expected in tf["cases"].items():
        assert other["cases"][name] == expected, f"{backend} differs from TensorFlow on {name}"


@pytest.mark.parametrize("backend", OTHERS)
def test_gradients_agree_with_tensorflows_to_float32_round_off(results, backend):
    other = _available(results, backend)
    tf = _available(results, "tensorflow")
    compared = 0
    for name, runs in tf["gradients"].items():
        assert len(other["gradients"][name]) == len(runs), name
        for run, other_run in zip(runs, other["gradients"][name]):
            for part in ("reduced", "base"):
                for k, (a, b) in enumerate(zip(run[part], other_run[part], strict=True)):
                    a, b = np.asarray(a), np.asarray(b)
                    bound = GRADIENT_RTOL * float(np.max(np.abs(a), initial=0.0))
                    np.testing.assert_allclose(b, a, rtol=0, atol=bound,
                                               err_msg=f"{backend} {name} {part}[{k}]")
                    compared += a.size
    assert compared > 1000


@pytest.mark.parametrize("backend", OTHERS)
def test_migrate_with_verify_checks_both_ways(results, backend):
    other = _available(results, backend)
    tf = _available(results, "tensorflow")
    good = other["migrations"]["good"]
    eps = float(np.finfo(np.float32).eps)
    assert good.pop("max_rel") <= 16 * eps  # the kept columns' outputs, to round-off
    expected = dict(tf["migrations"]["good"])
    assert expected.pop("max_rel") <= 16 * eps
    assert good == expected and good["ok"] and good["checked"] > 0 and good["compared"] > 0
    assert other["migrations"]["wrong_rule"] == tf["migrations"]["wrong_rule"]
    assert tf["migrations"]["wrong_rule"] == {
        "raised": "SurgeryError", "labels_wrongly": True, "names_kernel": True,
        "promised": True, "restored": True,
    }


def test_a_backend_without_a_probe_is_named():
    import keras_surgery as ks
    from keras_surgery.verify import probe_for_backend

    with pytest.raises(ks.SurgeryError, match="no probe for the 'numpy' backend.*backend=numpy"):
        probe_for_backend("numpy")


@pytest.mark.parametrize("backend", OTHERS)
def test_string_inputs_are_refused_naming_the_backend(backend):
    """Refused before the backend is imported, so this runs in the TensorFlow process."""
    import keras_surgery as ks
    from keras_surgery.verify.probe import PROBES, ProbeInput

    x = keras.Input((2,), name="obs")
    model = keras.Model(x, keras.layers.Dense(1, name="head")(x), name="texts")
    inputs = [ProbeInput("words", (2,), "string", False), ProbeInput("obs", (2,), "float32", True)]
    with pytest.raises(ks.SurgeryError) as info:
        PROBES[backend](model, inputs, [], [], seed=0)
    assert str(info.value) == (
        f"Gradient verification on the '{backend}' backend cannot feed the probe copy of "
        "model 'texts': input(s) ['words'] hold strings, which only TensorFlow tensors can. "
        "Run it with KERAS_BACKEND=tensorflow. Received: dtypes=['string', 'float32']"
    )
