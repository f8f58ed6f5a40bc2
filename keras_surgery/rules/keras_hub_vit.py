"""Rules for keras-hub's Vision Transformer layers: ViTPatchingAndEmbedding, ViTEncoder and
its ViTEncoderBlock.

Registered by their class names (keras-hub does not export them, so Keras knows them by those),
and keras-hub is never imported here. Each layer is labelled through its sublayers' own rules
(Conv2D, MultiHeadAttention, Dense, LayerNormalization, Add; `Composite`), in its store order:

* ViTPatchingAndEmbedding: a patch Conv2D (kernel = stride = patch size), its output grid
  flattened to a sequence of (row, column) patch labels, a class token put in front, and a
  position table added (rows by sequence position, "lookup"). A new input channel reads its
  own zeroed kernel slice, so the old outputs stay as they were.
* ViTEncoderBlock (keras-hub 0.32, read in `vit_layers.py`) is pre-LayerNorm:
  x + mha(LN1(x)), then x + mlp(LN2(x)), the MLP being dense_1 (gelu) then dense_2. A new block
  starts as the identity: the attention output projection and dense_2 start at 0, so both
  residual branches add 0. A grown `mlp_dim` gets fresh dense_1 columns and zero dense_2 rows.
* ViTEncoder: its blocks in order, then a final LayerNormalization (so a whole new encoder has
  no identity start, which the report says, naming it).

Every LayerNormalization mixes the hidden axis, so a grown hidden_dim is reported as not
preserving the function, naming the norm (issue 20 owns that rescaling).
"""

from __future__ import annotations

import re

import keras
import numpy as np

from keras_surgery.labels import AxisLabels, TensorLabels, concat_axes, unit_key
from keras_surgery.registry import register_rule
from keras_surgery.rules.api import (
    ZEROS,
    Composite,
    RuleCall,
    RuleResult,
    Start,
    check_weights,
    single_input,
    weight,
)
from keras_surgery.rules.attention import multi_head_attention_rule
from keras_surgery.rules.conv import as_tuple, conv_rule
from keras_surgery.rules.core import dense_rule
from keras_surgery.rules.elementwise import add_rule
from keras_surgery.rules.normalization import layer_normalization_rule
from keras_surgery.rules.reshaping import merge_axes

# Where keras-hub keeps the sublayers of ViTPatchingAndEmbedding (their saving-walk names).
CLASS_TOKEN = "vars/0"
PATCH_CONV = "patch_embedding"
POSITION_TABLE = "position_embedding/vars/0"
# ...and of a ViTEncoderBlock: the two residual branches end in these projections.
BLOCK_BRANCH_ENDS = ("mha/output_dense/", "mlp/dense_2/")


# -- patching and embedding ----------------------------------------------------------------------


def _data_format(call: RuleCall, x: TensorLabels, image_size: tuple[int, int]) -> str:
    """The patch convolution's layout. keras-hub 0.32 leaves `data_format` out of the layer's
    config, so it is read from where the image's (height, width) sit in the input, and from
    the config or Keras's default only when both layouts fit."""
    lengths = [a.length for a in x]
    fits = [fmt for fmt, hw in (("channels_last", lengths[:2]), ("channels_first", lengths[1:]))
            if tuple(hw) == image_size]
    if len(fits) == 1:
        return fits[0]
    if not fits:
        raise ValueError(f"{call.describe()}: input of shape {tuple(lengths)} is not an image "
                         f"of size {image_size}")
    return call.config.get("data_format") or keras.config.image_data_format()


def _patch_sequence(
    call: RuleCall, grid: TensorLabels, fmt: str, class_token: bool
) -> tuple[AxisLabels, AxisLabels]:
    """The sequence labels (class token first, then the patches row by row) and the hidden
    units, from the labels of the patch convolution's output grid."""
    if fmt == "channels_first":
        grid = grid[1:] + grid[:1]
    rows, columns, hidden = grid
    patches = merge_axes(call, [rows, columns])
    if not class_token:
        return patches, hidden
    token = AxisLabels(call.space.intern_many([unit_key(call.identity, "class_token", 0)]),
                       np.zeros(1, dtype=np.int64))
    return concat_axes([token, patches]), hidden


def vit_patching_and_embedding_rule(call: RuleCall) -> RuleResult:
    """ViTPatchingAndEmbedding on an image (height, width, channels), or channels first.

    The output (sequence, hidden) is the patch Conv2D's output grid flattened, behind the
    class token (if any), plus one position-table row per sequence position. The class token
    and the table's columns write the hidden units of the patch convolution.

    Args:
        call: the layer's call; its config gives image_size, patch_size, hidden_dim and
            use_class_token.

    Returns:
        The labels of its output and of its four (three without class token, or without a
        patch bias) variables.

    Raises:
        ValueError: the input is not an image of the configured size, or the variables are
            not keras-hub's (the layer is then opaque, with a warning naming it).

    Example:
        >>> ks.register_rule("MyPatching", vit_patching_and_embedding_rule)  # doctest: +SKIP
    """
    x = single_input(call)
    cfg = call.config
    if len(x) != 3:
        raise ValueError(f"{call.describe()}: expected an image input, got rank {len(x)}")
    image_size = as_tuple(call, cfg["image_size"], 2, "image_size")
    patch = as_tuple(call, cfg["patch_size"], 2, "patch_size")
    fmt = _data_format(call, x, image_size)
    locals_ = {w.local for w in call.weights}
    class_token = bool(cfg.get("use_class_token", True))
    if (CLASS_TOKEN in locals_) != class_token or POSITION_TABLE not in locals_:
        raise ValueError(f"{call.describe()}: variables {sorted(locals_)} are not keras-hub's "
                         f"ViTPatchingAndEmbedding (use_class_token={class_token})")
    parts = Composite(call)
    conv = {"filters": int(cfg["hidden_dim"]), "kernel_size": patch, "strides": patch,
            "padding": "valid", "data_format": fmt, "activation": None,
            "use_bias": f"{PATCH_CONV}/vars/1" in locals_}
    grid = parts.run(conv_rule, PATCH_CONV, "Conv2D", conv, [x])
    sequence, hidden = _patch_sequence(call, grid, fmt, class_token)
    by_position = AxisLabels(sequence.ids, np.zeros(len(sequence.ids), dtype=np.int64))
    own = {POSITION_TABLE: weight("position_embedding/embeddings", ("lookup", by_position),
                                  ("out", hidden))}
    if class_token:
        one = AxisLabels(call.space.intern_many([("broadcast",)]), np.zeros(1, dtype=np.int64))
        own[CLASS_TOKEN] = weight("class_token", ("struct", one), ("struct", one),
                                  ("out", hidden))
    for spec in call.weights:
        if spec.local in own:
            parts.weights[spec.path] = own[spec.local]
    result = parts.result([(sequence, hidden)])
    check_weights(call, result.weights)
    return result


# -- encoder blocks and the encoder --------------------------------------------------------------


def _sequence(call: RuleCall) -> TensorLabels:
    x = single_input(call)
    if len(x) != 2 or not x[-1].length:
        raise ValueError(f"{call.describe()}: expected one (sequence, hidden) input")
    return x


def _encoder_block(parts: Composite, prefix: str, x: TensorLabels) -> TensorLabels:
    """Labels one pre-LayerNorm ViTEncoderBlock saved under `prefix` (ending in "/", or ""),
    reading the stream `x`: x + mha(LN1(x)), then x + mlp(LN2(x)). Its config is that of the
    layer `parts` labels (a ViTEncoder's or the block's own: the same keys)."""
    cfg, run = parts.call.config, parts.run
    hidden, heads = x[-1].length or 0, int(cfg["num_heads"])
    if heads < 1 or hidden % heads:
        raise ValueError(f"{parts.call.describe()}: hidden width {hidden} for {heads} heads")
    norm = {"axis": -1, "epsilon": float(cfg.get("layer_norm_epsilon", 1e-6))}
    # keras-hub gives every head hidden_dim // num_heads dimensions.
    mha = {"num_heads": heads, "key_dim": hidden // heads,
           "use_bias": bool(cfg.get("use_mha_bias", True))}
    bias = {"use_bias": bool(cfg.get("use_mlp_bias", True))}
    h = run(layer_normalization_rule, f"{prefix}layer_norm_1", "LayerNormalization", norm, [x])
    attended = run(multi_head_attention_rule, f"{prefix}mha", "MultiHeadAttention", mha, [h, h])
    x = run(add_rule, f"{prefix}add", "Add", {}, [attended, x])
    h = run(layer_normalization_rule, f"{prefix}layer_norm_2", "LayerNormalization", norm, [x])
    h = run(dense_rule, f"{prefix}mlp/dense_1", "Dense",
            {"units": int(cfg["mlp_dim"]), "activation": "gelu", **bias}, [h])
    h = run(dense_rule, f"{prefix}mlp/dense_2", "Dense", {"units": hidden, **bias}, [h])
    return run(add_rule, f"{prefix}add", "Add", {}, [x, h])


def _identity_start(parts: Composite, prefix: str, x: TensorLabels) -> Start:
    """A block under `prefix` with its branches' last projections (kernels and biases) at 0
    outputs its input `x`."""
    ends = tuple(prefix + end for end in BLOCK_BRANCH_ENDS)
    values = {w.role: ZEROS for w in parts.weights.values() if w.role.startswith(ends)}
    return Start("identity", values, [x])


def vit_encoder_block_rule(call: RuleCall) -> RuleResult:
    """ViTEncoderBlock called on (sequence, hidden): see `_encoder_block`. A new block starts
    as the identity (attention output projection and MLP dense_2 at 0).

    Args:
        call: the block's call; its config gives num_heads, mlp_dim, use_mha_bias,
            use_mlp_bias and layer_norm_epsilon.

    Returns:
        The labels of its output and variables, and its identity start.

    Raises:
        ValueError: the input is not (sequence, hidden), or the variables are not keras-hub's
            (the layer is then opaque, with a warning naming it).

    Example:
        >>> ks.register_rule("MyViTBlock", vit_encoder_block_rule)  # doctest: +SKIP
    """
    x = _sequence(call)
    parts = Composite(call)
    out = _encoder_block(parts, "", x)
    return parts.result([out], starts={"identity": _identity_start(parts, "", x)})


_BLOCK_NAME = re.compile(r"(?P<base>.*?)(?:_(?P<index>\d+))?")


def encoder_blocks(call: RuleCall) -> list[str]:
    """The prefixes a ViTEncoder's blocks are saved under, in the order they run.

    Keras saves the list `encoder_layers` by class name, numbering repeats: block 0 is
    `encoder_layers/vi_t_encoder_block/`, block k `encoder_layers/vi_t_encoder_block_k/`.
    """
    names = {w.local.split("/")[1] for w in call.weights
             if w.local.startswith("encoder_layers/") and w.local.count("/") > 1}
    order = {}
    for name in names:
        found = _BLOCK_NAME.fullmatch(name)
        order[int(found["index"] or 0)] = (found["base"], name)
    n = int(call.config["num_layers"])
    if sorted(order) != list(range(n)) or len({base for base, _ in order.values()}) > 1:
        raise ValueError(f"{call.describe()}: num_layers={n}, but its variables hold the blocks "
                         f"{sorted(names)}")
    return [f"encoder_layers/{order[k][1]}/" for k in range(n)]


def vit_encoder_rule(call: RuleCall) -> RuleResult:
    """ViTEncoder called on (sequence, hidden): its ViTEncoderBlocks in order, then a final
    LayerNormalization (`layer_norm`), which a new encoder cannot start as (LN(x) is not x).

    Args:
        call: the encoder's call; its config gives num_layers and the blocks' settings.

    Returns:
        The labels of its output and of every block's variables, in store order.

    Raises:
        ValueError: the input is not (sequence, hidden), or the variables do not hold
            num_layers keras-hub blocks (the layer is then opaque, with a warning naming it).

    Example:
        >>> ks.register_rule("MyViTEncoder", vit_encoder_rule)  # doctest: +SKIP
    """
    x = _sequence(call)
    parts = Composite(call)
    h, added, notes = x, {}, []
    for prefix in encoder_blocks(call):
        out = _encoder_block(parts, prefix, h)
        if call.old_roles is None or any(r.startswith(prefix) for r in call.old_roles):
            h = out
            continue
        # A block the old encoder did not have: it starts as the identity, so the stream
        # after it is the stream before it.
        start = _identity_start(parts, prefix, h)
        added.update({w.role: start.values.get(w.role) for w in parts.weights.values()
                      if w.role.startswith(prefix)})
        notes.append(f"{call.describe()}: block '{prefix[:-1]}' is new; it starts as the "
                     "identity (its attention output projection and MLP dense_2 at 0)")
    norm = {"axis": -1, "epsilon": float(call.config.get("layer_norm_epsilon", 1e-6))}
    out = parts.run(layer_normalization_rule, "layer_norm", "LayerNormalization", norm, [h])
    refused = Start("identity", refused="it ends in a LayerNormalization ('layer_norm'), and "
                    "LayerNorm(x) is not x")
    result = parts.result([out], starts={"identity": refused}, added=added)
    result.warnings.extend(notes)
    return result


# The settings that change what these layers compute while their weights keep their shapes.
# (keras-hub 0.32 leaves `data_format` and `use_patch_bias` out of ViTPatchingAndEmbedding's
# config; the rule reads them from the input's shape and the variables.)
PATCHING_KEYS = ("image_size", "patch_size", "use_class_token")
ENCODER_KEYS = ("layer_norm_epsilon", "use_mha_bias", "use_mlp_bias")

register_rule("ViTPatchingAndEmbedding", vit_patching_and_embedding_rule,
              function_keys=PATCHING_KEYS)
register_rule("ViTEncoderBlock", vit_encoder_block_rule, function_keys=ENCODER_KEYS)
register_rule("ViTEncoder", vit_encoder_rule, function_keys=ENCODER_KEYS)
