"""Built-in labelling rules, one module per layer family; importing this registers them."""

from keras_surgery.rules import (  # noqa: F401
    attention,
    conv,
    core,
    elementwise,
    embedding,
    keras_hub,
    normalization,
    pooling,
    recurrent,
    reshaping,
)
