"""Built-in labelling rules, one module per layer family; importing this registers them."""

from keras_surgery.rules import core, elementwise, normalization  # noqa: F401
