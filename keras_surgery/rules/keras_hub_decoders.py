"""Rules for keras-hub's pre-RMSNorm decoder layers (Llama, Mistral, Qwen, Qwen3, Gemma) and
their RMS norms.

Registered by name, so keras-hub is never imported here. Each decoder layer is labelled
through its sublayers (`Composite`), in its store order:

    x + attention(norm(x)), then x + down(act(gate(norm(x))) * up(norm(x)))

(Gemma may add a post-norm behind each branch: RMS normalisation maps 0 to 0, so it changes
nothing below.) What each weight axis means:

* the residual stream (hidden_dim) is read ("in") by the RMS norms' outputs and written
  ("out") by the token embedding and the attention output and down projections; every RMS
  norm mixes it, and a grown hidden_dim keeps the old function exactly (up to epsilon) when
  the new dims start at 0 wherever they are written: the planner then zeroes those writers'
  new columns and each norm's gain is rescaled by sqrt(d_old / d_new) (see
  `rules.normalization.rms_normalization_rule` and `operators.accept_zero_growths`). Llama,
  Mistral (without head_dim) and Qwen derive head_dim = hidden_dim / num_query_heads, so
  hidden_dim must grow with the heads in proportion; else head_dim grows (below);
* query heads are units labelled (key/value head, rank in its group): keras-hub repeats each
  key/value head over `num_query_heads // num_key_value_heads` consecutive query heads, so
  labelling a query head by the head it reads keeps the grouping when heads or key/value heads
  grow; a new head's rows of the output projection start at 0;
* head_dim ("key_dim", "value_dim") is a unit axis that mixes: the rotary embedding rotates
  dimension i with i + head_dim / 2 at frequencies set by head_dim, so growing it is reported;
* the MLP's intermediate units carry one label each, shared by the gate and up projections,
  and read by the down projection's rows: a grown `intermediate_dim` gets fresh gate/up
  columns and zero down rows, which keeps the old function exactly.

Under policy "duplicate" a growth of hidden_dim by a whole factor k is exact instead (epsilon
included): every residual dim, query and key/value head and intermediate unit is copied k
times, the norms' mean of squares over [x, x] is x's, so their gains are duplicated unscaled,
and every weight reading a duplicated axis gives each copy 1/k (`net2net`,
`operators.accept_duplicate_growths`); head_dim must stay (grow the heads with hidden_dim), or
the rotary frequencies move and the report says so.

Gemma's backbone multiplies the embeddings by sqrt(hidden_dim), a constant of the graph: when
it changes, the token table's copied columns are multiplied by sqrt(d_old / d_new) and the
final norm, which feeds the tied logits that read the table back, by the inverse
(`operators.compensate_constants`), so a grown Gemma keeps its logits.

A new decoder layer starts as the identity: the attention output projection and the down
projection start at 0, so both residual branches add 0. (Duplicating a layer in place with
both copies' residual branches halved is not offered: it does not keep the old function,
because the second copy reads the first one's output.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from keras_surgery.labels import AxisLabels, TensorLabels, unit_key
from keras_surgery.registry import register_rule
from keras_surgery.rules.api import (
    ZEROS,
    Composite,
    Mixing,
    RuleCall,
    RuleResult,
    Start,
    WeightLabels,
    check_weights,
    single_input,
    weight,
)
from keras_surgery.rules.elementwise import add_rule
from keras_surgery.rules.normalization import rms_normalization_rule


@dataclass(frozen=True)
class DecoderFamily:
    """Where one keras-hub decoder family keeps its sublayers (the attributes its variables
    are saved under) and how its attention kernels are laid out."""

    attention: str
    query: str
    key: str
    value: str
    output: str
    norms: tuple[str, str]  # before the attention, before the MLP
    gate: str  # goes through the activation
    up: str
    down: str
    heads_first: bool = False  # query/key/value kernels (heads, hidden, head_dim) (Gemma)
    qk_norms: tuple[str, str] | None = None  # per-head RMS norms of queries and keys (Qwen3)
    post_norms: tuple[str, str] | None = None  # optional, behind each branch (Gemma)
    gain_offset: float = 0.0  # the norms' gain is offset + scale (Gemma: 1 + scale)
    caches: tuple[str, ...] = ("self_attention_cache", "self_attention_cache_update_index")


_LLAMA_LIKE = dict(
    attention="_self_attention_layer", query="_query_dense", key="_key_dense",
    value="_value_dense", output="_output_dense",
    norms=("_self_attention_layernorm", "_feedforward_layernorm"),
    gate="_feedforward_gate_dense", up="_feedforward_intermediate_dense",
    down="_feedforward_output_dense",
)
LLAMA_LIKE = DecoderFamily(**_LLAMA_LIKE)
QWEN3 = DecoderFamily(**_LLAMA_LIKE,
                      qk_norms=("_query_dense_layer_norm", "_key_dense_layer_norm"))
GEMMA = DecoderFamily(
    attention="attention", query="query_dense", key="key_dense", value="value_dense",
    output="output_dense", norms=("pre_attention_norm", "pre_ffw_norm"), gate="gating_ffw",
    up="gating_ffw_2", down="ffw_linear", heads_first=True,
    post_norms=("post_attention_norm", "post_ffw_norm"), gain_offset=1.0,
    caches=("cache", "cache_update_index"),
)


def _shape(call: RuleCall, local: str) -> tuple[int, ...]:
    for spec in call.weights:
        if spec.local == local:
            return spec.shape
    raise ValueError(f"{call.describe()} has no variable {local!r}")


def _labels(call: RuleCall, keys: list[tuple], dep: int) -> AxisLabels:
    return AxisLabels(call.space.intern_many(keys), np.full(len(keys), dep, dtype=np.int64))


def _by_variable(call: RuleCall, table: dict[str, list[WeightLabels]]) -> list[WeightLabels]:
    """The labellings of `table` (sublayer -> its variables in order) in store order, with
    roles prefixed by their sublayer."""
    weights = []
    for spec in call.weights:
        sub, _, index = spec.local.partition("/vars/")
        found = table.get(sub, [])
        if not index.isdigit() or int(index) >= len(found):
            raise ValueError(f"{call.describe()}: unexpected variable {spec.local}")
        w = found[int(index)]
        weights.append(WeightLabels(f"{sub}/{w.role}", w.axes, w.rescale, w.trainable))
    return check_weights(call, weights)


def grouped_query_attention_rule(family: DecoderFamily) -> Callable[[RuleCall], RuleResult]:
    """The rule of a family's grouped-query attention sublayer (config: num_query_heads,
    num_key_value_heads), reading the normalised stream of shape (sequence, hidden)."""

    def rule(call: RuleCall) -> RuleResult:
        h = single_input(call)
        heads = int(call.config["num_query_heads"])
        kv_heads = int(call.config["num_key_value_heads"])
        if kv_heads < 1 or heads % kv_heads:
            raise ValueError(f"{call.describe()}: {heads} query heads for {kv_heads} key/value "
                             "heads (keras-hub needs a whole number of query heads per group)")
        q_shape = _shape(call, f"{family.query}/vars/0")
        head_dim = q_shape[-1]
        dep = call.union(*h)
        group = heads // kv_heads
        me = call.identity
        q_heads = _labels(call, [unit_key(me, "head", (u // group, u % group))  # type: ignore
                                 for u in range(call.weight_backed(heads, "num_query_heads"))],
                          dep)
        kv = _labels(call, [unit_key(me, "kv_head", g) for g in range(kv_heads)], dep)
        key_dim = call.units(head_dim, dep, role="key_dim")
        value_dim = call.units(head_dim, dep, role="value_dim")
        if h[-1].ids is None:
            raise ValueError(f"{call.describe()}: hidden axis of unknown length")
        out = _labels(call, [unit_key(me, "out", int(i)) for i in h[-1].ids], dep)

        def projection(units: AxisLabels, dims: AxisLabels) -> list[WeightLabels]:
            kernel = (weight("kernel", ("out", units), ("in", h[-1]), ("out", dims))
                      if family.heads_first
                      else weight("kernel", ("in", h[-1]), ("out", units), ("out", dims)))
            return [kernel, weight("bias", ("out", units), ("out", dims))]

        table = {family.query: projection(q_heads, key_dim), family.key: projection(kv, key_dim),
                 family.value: projection(kv, value_dim),
                 family.output: [weight("kernel", ("in", q_heads), ("in", value_dim),
                                        ("out", out)), weight("bias", ("out", out))]}
        if family.qk_norms:
            for name in family.qk_norms:
                table[name] = [weight("scale", ("diag", key_dim))]
        mixing = [Mixing((h[0],), "softmax over the attended positions"),
                  Mixing((key_dim,), "the rotary embedding pairs dimension i with i + head_dim/2 "
                                     "at frequencies set by head_dim")]
        return RuleResult([(h[0], out)], _by_variable(call, table), mixing)

    return rule


def _projection(units: AxisLabels | None, n: int = 0) -> Callable[[RuleCall], RuleResult]:
    """A Dense / EinsumDense sublayer from the last axis of its input to `units` (or to `n`
    units of its own), with an optional bias."""

    def rule(call: RuleCall) -> RuleResult:
        x = single_input(call)
        out = units if units is not None else call.units(n, call.union(x[-1]))
        weights = [weight("kernel", ("in", x[-1]), ("out", out)), weight("bias", ("out", out))]
        return RuleResult([x[:-1] + (out,)], check_weights(call, weights[:len(call.weights)]))

    return rule


class _Decoder:
    """Labels one call of a decoder layer of `family`, block by block."""

    def __init__(self, call: RuleCall, family: DecoderFamily):
        self.call, self.family = call, family
        self.parts = Composite(call)
        self.norm = {"axis": -1, "epsilon": float(call.config.get("layer_norm_epsilon", 1e-6)),
                     "gain_offset": family.gain_offset}
        self.post = family.post_norms if family.post_norms else (None, None)

    def rms(self, attribute: str | None, x: TensorLabels) -> TensorLabels:
        present = attribute and any(w.local.startswith(attribute + "/") for w in self.call.weights)
        if not present:
            return x
        return self.parts.run(rms_normalization_rule, attribute, "RMSNormalization", self.norm,
                              [x])

    def attention(self, x: TensorLabels) -> TensorLabels:
        f, cfg = self.family, self.call.config
        h = self.rms(f.norms[0], x)
        gqa = {k: cfg[k] for k in ("num_query_heads", "num_key_value_heads")}
        a = self.parts.run(grouped_query_attention_rule(f), f.attention, "Attention", gqa, [h])
        return self.parts.run(add_rule, "add", "Add", {}, [x, self.rms(self.post[0], a)])

    def feedforward(self, x: TensorLabels) -> TensorLabels:
        f = self.family
        h = self.rms(f.norms[1], x)
        n = self.call.weight_backed(_shape(self.call, f"{f.gate}/vars/0")[-1], "intermediate_dim")
        units = self.call.units(n, self.call.union(h[-1]), role="intermediate")
        gate = self.parts.run(_projection(units), f.gate, "Dense", {}, [h])
        self.parts.run(_projection(units), f.up, "Dense", {}, [h])  # same units as the gate
        down = self.parts.run(_projection(None, x[-1].length or 0), f.down, "Dense", {}, [gate])
        return self.parts.run(add_rule, "add", "Add", {}, [x, self.rms(self.post[1], down)])

    def result(self, x: TensorLabels, out: TensorLabels) -> RuleResult:
        """Starts as the identity with both branches' last projections at 0."""
        f = self.family
        last = (f"{f.attention}/{f.output}/", f"{f.down}/")
        values = {w.role: ZEROS for w in self.parts.weights.values() if w.role.startswith(last)}
        return self.parts.result([out], starts={"identity": Start("identity", values, [x])})


def decoder_rule(family: DecoderFamily) -> Callable[[RuleCall], RuleResult]:
    """The rule of a pre-RMSNorm decoder layer of `family` called on (sequence, hidden) with
    an optional padding mask; cached decoding has no rule.

    Args:
        family: where the family keeps its sublayers.

    Returns:
        The rule, which raises ValueError (the layer is then opaque, with a warning naming it)
        for a cached call or variables the family does not have.

    Example:
        >>> ks.register_rule("MyDecoder", decoder_rule(LLAMA_LIKE))  # doctest: +SKIP
    """

    def rule(call: RuleCall) -> RuleResult:
        positional = call.positional_inputs()
        if not positional or len(positional[0]) != 2:
            raise ValueError(f"{call.describe()}: expected one (sequence, hidden) input")
        if any(call.keyword_input(k) is not None or call.call_kwargs.get(k) is not None
               for k in family.caches):
            raise ValueError("cached decoding has no rule")
        x = positional[0]
        decoder = _Decoder(call, family)
        return decoder.result(x, decoder.feedforward(decoder.attention(x)))

    return rule


# The settings that change what a decoder computes while its weights keep their shapes.
_ROPE = ("rope_max_wavelength", "rope_scaling_factor")
FAMILY_KEYS: dict[str, tuple[DecoderFamily, tuple[str, ...]]] = {
    "LlamaTransformerDecoder": (LLAMA_LIKE, _ROPE + (
        "rope_position_scaling_factor", "rope_frequency_adjustment_factor",
        "rope_low_freq_factor", "rope_high_freq_factor", "rope_pretraining_sequence_length",
        "activation", "layer_norm_epsilon")),
    "MistralTransformerDecoder": (LLAMA_LIKE, _ROPE + (
        "sliding_window", "activation", "layer_norm_epsilon")),
    "QwenTransformerDecoder": (LLAMA_LIKE, _ROPE + (
        "use_sliding_window_attention", "sliding_window_size", "activation",
        "layer_norm_epsilon")),
    "Qwen3TransformerDecoder": (QWEN3, _ROPE + (
        "sliding_window_size", "activation", "layer_norm_epsilon")),
    "GemmaDecoderBlock": (GEMMA, (
        "layer_norm_epsilon", "logit_soft_cap", "use_sliding_window_attention",
        "sliding_window_size", "query_head_dim_normalize", "use_post_attention_norm",
        "use_post_ffw_norm")),
}
# keras-hub's RMS norms, by class name. Gemma's is named like Keras's own RMSNormalization
# (registered by class in `rules.normalization`), and so are keras-hub's own and Gemma 3's and
# 4's; the gain is 1 + scale in Gemma's and Gemma 3's (see `keras_hub_rms_rule`).
RMS_NORMS = ("LlamaLayerNorm", "MistralLayerNormalization", "QwenLayerNorm", "Qwen3LayerNorm",
             "RMSNormalization")
_ONE_PLUS_SCALE_MODULES = ("keras_hub.src.models.gemma.", "keras_hub.src.models.gemma3.")


def keras_hub_rms_rule(call: RuleCall) -> RuleResult:
    """A keras-hub RMS norm; its gain is 1 + scale in the modules that compute it so."""
    module = call.layer.module or ""
    return rms_normalization_rule(call, 1.0 if module.startswith(_ONE_PLUS_SCALE_MODULES)
                                  else None)


# These classes are not exported by keras-hub, so Keras knows them by their bare class names.
for _name, (_family, _keys) in FAMILY_KEYS.items():
    register_rule(_name, decoder_rule(_family), function_keys=_keys)
for _name in RMS_NORMS:
    register_rule(_name, keras_hub_rms_rule, function_keys=("epsilon",))
