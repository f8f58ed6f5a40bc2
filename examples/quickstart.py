"""keras-surgery quick start: change a trained model's input features and width, keep training.

1. Train a small tabular regression model on 6 named features and save it as old.keras.
2. Redesign it: insert two new features, drop one, reorder the rest, widen the hidden layer.
3. Migrate the trained weights into the new model with `ks.migrate_weights`.
4. Check the new model computes the old function exactly, then keep training it: it resumes
   at the old loss, while the same architecture trained from scratch starts far above it.

Run with `make demo`.
"""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_surgery as ks  # noqa: E402

OLD_FEATURES = ["age", "income", "tenure", "visits", "clicks", "basket"]
# New design: "spend" and "region_id" inserted, "visits" dropped, the rest reordered.
NEW_FEATURES = ["income", "spend", "age", "clicks", "region_id", "basket", "tenure"]


def make_data(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Synthetic customers: every feature we will ever use, by name."""
    columns = {name: rng.normal(size=n).astype("float32")
               for name in set(OLD_FEATURES) | set(NEW_FEATURES)}
    target = (
        np.sin(columns["age"]) + 0.5 * columns["income"] * columns["tenure"]
        + 0.3 * columns["clicks"] ** 2 - 0.4 * columns["basket"] + 0.8 * columns["spend"]
        + 0.1 * columns["visits"]
    )
    columns["target"] = target.astype("float32")
    return columns


def matrix(data: dict[str, np.ndarray], names: list[str]) -> np.ndarray:
    return np.stack([data[n] for n in names], axis=1)


def build(n_features: int, hidden: int) -> keras.Model:
    inputs = keras.Input((n_features,), name="features")
    x = keras.layers.Dense(hidden, activation="relu", name="hidden")(inputs)
    x = keras.layers.Dense(hidden // 2, activation="relu", name="hidden2")(x)
    outputs = keras.layers.Dense(1, name="prediction")(x)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="mse")
    return model


def main() -> None:
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    train, test = make_data(4096, rng), make_data(1024, rng)
    workdir = tempfile.mkdtemp(prefix="keras-surgery-demo-")
    old_path = os.path.join(workdir, "old.keras")

    print("1. training the old model on", OLD_FEATURES)
    old = build(len(OLD_FEATURES), 32)
    old.fit(matrix(train, OLD_FEATURES), train["target"], epochs=15, batch_size=128, verbose=0)
    old_loss = old.evaluate(matrix(test, OLD_FEATURES), test["target"], verbose=0)
    old.save(old_path)
    print(f"   old model test loss: {old_loss:.4f}  (saved to {old_path})")

    print("2. new design:", NEW_FEATURES, "and hidden layer 32 -> 48")
    new = build(len(NEW_FEATURES), 48)

    print("3. migrating the trained weights")
    report = ks.migrate_weights(
        old_path, new,
        old_features={"features": OLD_FEATURES},
        new_features={"features": NEW_FEATURES},
    )
    print(report.summary())

    # The promise: with the removed feature set to 0 in the old input, the new model computes
    # exactly the old function, whatever values the new features take.
    x_old = matrix(test, OLD_FEATURES)
    x_old[:, OLD_FEATURES.index("visits")] = 0.0
    x_new = matrix(test, NEW_FEATURES)
    diff = float(np.max(np.abs(old.predict(x_old, verbose=0) - new.predict(x_new, verbose=0))))
    preserved = report.preserves_function
    print(f"   max |new(x) - old(x)| = {diff:.2e}  (preserves_function={preserved})")
    if not report.preserves_function or diff > 1e-5:
        raise SystemExit("surgery did not preserve the old function")

    print("4. training continues")
    scratch = build(len(NEW_FEATURES), 48)
    x_train, x_test = matrix(train, NEW_FEATURES), matrix(test, NEW_FEATURES)
    for name, model in (("after surgery", new), ("from scratch ", scratch)):
        start = model.evaluate(x_test, test["target"], verbose=0)
        model.fit(x_train, train["target"], epochs=3, batch_size=128, verbose=0)
        end = model.evaluate(x_test, test["target"], verbose=0)
        print(f"   {name}: test loss {start:.4f} at start -> {end:.4f} after 3 epochs")


if __name__ == "__main__":
    main()
