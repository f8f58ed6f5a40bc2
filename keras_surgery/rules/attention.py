"""Rules for attention layers: MultiHeadAttention, Attention, AdditiveAttention."""

from __future__ import annotations

import dataclasses

import keras
import numpy as np

from keras_surgery.labels import AxisLabels, TensorLabels, unit_key
from keras_surgery.registry import register_rule
from keras_surgery.rules.api import Mixing, RuleCall, RuleResult, check_weights, weight


def _qkv(call: RuleCall, names: tuple[str, str, str]) -> tuple[TensorLabels, ...]:
    """query, value, key labels from positional or keyword arguments (key defaults to value)."""
    positional = call.positional_inputs()
    if len(positional) == 1 and len(call.inputs) >= 2 and not call.kwarg_inputs:
        positional = call.inputs  # Attention layers take one list argument
    found = list(positional[:3])
    for name in names[len(found):]:
        x = call.keyword_input(name)
        if x is None:
            break
        found.append(x)
    if len(found) < 2:
        raise ValueError(f"{call.describe()}: expected query and value inputs")
    query, value = found[0], found[1]
    key = found[2] if len(found) > 2 else value
    return query, value, key


def multi_head_attention_rule(call: RuleCall) -> RuleResult:
    """MultiHeadAttention over one attention axis.

    Heads, key_dim and value_dim indices are units of the layer. Growing them is exact:
    new heads' outputs enter the output projection through zeroed rows; new value_dim columns
    likewise; new key_dim columns of the query projection are zeroed (`zero_new`), since q.k
    contracts two activations; and the copied query projection is scaled by
    sqrt(new key_dim / old key_dim) to cancel the change of Keras's 1/sqrt(key_dim) factor.
    """
    cfg = call.config
    if cfg.get("use_gate") or cfg.get("sliding_window") is not None:
        raise ValueError("gated or sliding-window attention is not supported")
    attention_axes = cfg.get("attention_axes")
    query, value, key = _qkv(call, ("query", "value", "key"))
    if attention_axes not in (None, (1,), [1], 1, (-2,), [-2]) or len(query) != 2:
        raise ValueError("only (sequence, features) inputs attending over the sequence")
    dep = call.union(*query, *value, *key)
    heads = call.units(int(cfg["num_heads"]), dep, role="head")
    key_dim = call.units(int(cfg["key_dim"]), dep, role="key_dim")
    value_dim = call.units(int(cfg.get("value_dim") or cfg["key_dim"]), dep, role="value_dim")
    out_shape = cfg.get("output_shape")
    if out_shape:
        dims = [out_shape] if isinstance(out_shape, int) else list(out_shape)
        if len(dims) != 1:
            raise ValueError("multi-axis output_shape is not supported")
        out = call.units(int(dims[0]), dep, role="out")
    else:
        # The output has the query's width; its indices are units of the output projection,
        # one per query index, so a widened residual stream keeps them aligned.
        q_ids = query[-1].ids
        if q_ids is None:
            raise ValueError("query feature axis of unknown length")
        ids = call.space.intern_many(unit_key(call.identity, "out", int(i)) for i in q_ids)
        out = AxisLabels(ids, np.full(len(ids), dep, dtype=np.int64))
    bias = bool(cfg.get("use_bias", True))

    def projection(x: TensorLabels, second: AxisLabels, zero_new: bool, rescale) -> list:
        kernel = weight("kernel", ("in", x[-1]), ("out", heads), ("out", second, zero_new),
                        rescale=rescale)
        result = [kernel]
        if bias:
            result.append(weight("bias", ("out", heads), ("out", second, zero_new),
                                 rescale=(1, 0.5) if rescale else None))
        return result

    by_sublayer = {
        "key_dense": projection(key, key_dim, False, None),
        "output_dense": [weight("kernel", ("in", heads), ("in", value_dim), ("out", out))]
        + ([weight("bias", ("out", out))] if bias else []),
        "query_dense": projection(query, key_dim, True, (2, 0.5)),
        "value_dense": projection(value, value_dim, False, None),
    }
    weights = []
    for spec in call.weights:
        sub, _, index = spec.local.partition("/vars/")
        if sub not in by_sublayer or not index.isdigit() or int(index) >= len(by_sublayer[sub]):
            raise ValueError(f"unexpected variable {spec.local}")
        w = by_sublayer[sub][int(index)]
        weights.append(dataclasses.replace(w, role=f"{sub}/{w.role}"))
    outputs: list[TensorLabels] = [(query[0], out)]
    if len(call.output_shapes) > 1:  # return_attention_scores
        outputs.append((heads, query[0], key[0]))
    mixing = [Mixing((key[0],), "softmax over the attended positions")]
    return RuleResult(outputs, check_weights(call, weights), mixing)


def _attention_outputs(
    call: RuleCall, query: TensorLabels, value: TensorLabels, key: TensorLabels
) -> list[TensorLabels]:
    """The value's features at the query's positions (each also depending on everything the
    scores read), and the scores (query x key positions) when they are returned."""
    dep = call.union(*query, *key)
    v_last = value[-1]
    out_last = AxisLabels(v_last.ids, call.deps.union_elementwise(
        [v_last.deps, np.full(len(v_last.deps), dep, dtype=np.int64)]))
    outputs: list[TensorLabels] = [(query[0], out_last)]
    if len(call.output_shapes) > 1:
        outputs.append((query[0], key[0]))
    return outputs


def attention_rule(call: RuleCall) -> RuleResult:
    """Attention (dot or concat scores): the scores contract query and key features, so those
    feature axes mix; the output carries the value's features at the query's positions."""
    query, value, key = _qkv(call, ("query", "value", "key"))
    weights = [weight(w.local) for w in call.weights]  # scalar scale / concat_score_weight
    mixing = [
        Mixing((query[-1],), "attention scores contract the query features"),
        Mixing((key[-1],), "attention scores contract the key features"),
        Mixing((key[0],), "softmax over the attended positions"),
    ]
    return RuleResult(_attention_outputs(call, query, value, key), check_weights(call, weights),
                      mixing)


def additive_attention_rule(call: RuleCall) -> RuleResult:
    """AdditiveAttention: scores = sum_f scale_f * tanh(q_f + k_f). With `use_scale` each
    feature has its own scale, so a new feature with zero scale leaves the scores unchanged."""
    query, value, key = _qkv(call, ("query", "value", "key"))
    mixing = [Mixing((key[0],), "softmax over the attended positions")]
    if call.config.get("use_scale", True):
        q_f, k_f = query[-1], key[-1]
        reads = q_f  # scale_f reads tanh(q_f + k_f): both features' dependencies
        if q_f.ids is not None and k_f.ids is not None and len(q_f.deps) == len(k_f.deps):
            reads = AxisLabels(q_f.ids, call.deps.union_elementwise([q_f.deps, k_f.deps]))
        weights = [weight("scale", ("in", reads))]
    else:
        weights = []
        mixing.append(Mixing((query[-1],), "unscaled scores sum over every feature"))
    return RuleResult(_attention_outputs(call, query, value, key), check_weights(call, weights),
                      mixing)


register_rule(keras.layers.MultiHeadAttention, multi_head_attention_rule,
              function_keys=("attention_axes", "use_bias"))
register_rule(keras.layers.Attention, attention_rule, function_keys=("use_scale", "score_mode"))
register_rule(keras.layers.AdditiveAttention, additive_attention_rule,
              function_keys=("use_scale",))
