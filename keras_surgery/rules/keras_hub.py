"""Rules for keras-hub's modelling layers: PositionEmbedding, TokenAndPositionEmbedding,
TransformerEncoder and TransformerDecoder (the ReversibleEmbedding rule is in
`rules.embedding`, since the layer moved into Keras 3.15).

Registered by their keras-hub (and older keras-nlp) registered names, so keras-hub is never
imported here. A transformer layer is labelled through its sublayers' own rules (attention,
Dense, LayerNormalization, Add; `Composite`), in its store order:

* pre-LayerNorm (`normalize_first=True`, GPT-2): x + attention(LN(x)), then x + ffn(LN(x)). A
  new such layer starts as the identity: the attention output projection and the feed-forward
  output Dense start at 0, so both residual branches add 0.
* post-LayerNorm (BERT): LN(x + attention(x)), then LN(x + ffn(x)). It has no identity start
  (LN(x) is not x), which the report says, naming the layer.

Their LayerNormalizations mix the hidden axis, so a grown hidden_dim is reported too.
"""

from __future__ import annotations

from keras_surgery.labels import AxisLabels, TensorLabels, positions
from keras_surgery.registry import register_rule
from keras_surgery.rules.api import (
    ZEROS,
    Composite,
    RuleCall,
    RuleResult,
    Start,
    check_weights,
    weight,
)
from keras_surgery.rules.attention import multi_head_attention_rule
from keras_surgery.rules.core import dense_rule
from keras_surgery.rules.elementwise import add_rule, passthrough_rule
from keras_surgery.rules.embedding import EMBEDDING_KEYS, reversible_embedding_rule
from keras_surgery.rules.normalization import layer_normalization_rule


def _sequence(call: RuleCall) -> TensorLabels:
    """The (sequence, features) tensor a layer is called on."""
    positional = call.positional_inputs()
    if not positional:
        raise ValueError(f"{call.describe()} has no positional input")
    x = positional[0]
    if len(x) != 2:
        raise ValueError(f"{call.describe()}: only (sequence, features) inputs, got rank {len(x)}")
    return x


def _position_rows(call: RuleCall, n: int) -> AxisLabels:
    """The rows of a position table: row i is used at sequence position i."""
    return positions(call.space, 0, call.weight_backed(n, "sequence_length"))


def position_embedding_rule(call: RuleCall) -> RuleResult:
    """PositionEmbedding: outputs row i of its table at sequence position i, whatever the input
    values (only the input's shape is read). Rows are looked up by position ("lookup"), so a
    longer `sequence_length` keeps the old rows; columns are units of the layer."""
    x = _sequence(call)
    if call.keyword_input("positions") is not None or call.call_kwargs.get("positions"):
        raise ValueError("custom `positions` have no rule")
    if call.call_kwargs.get("start_index", 0) not in (0, None):
        raise ValueError("a non-zero `start_index` has no rule")
    rows = _position_rows(call, int(call.config["sequence_length"]))
    dim = call.units(x[-1].length or 0, 0)
    out = (x[0], dim)
    starts = {"zero": Start("zero", {"embeddings": ZEROS},
                            lambda: [(x[0], call.zeros(len(dim.ids)))])}
    return RuleResult([out], check_weights(call, [weight("embeddings", ("lookup", rows),
                                                         ("out", dim))]), starts=starts)


def token_and_position_embedding_rule(call: RuleCall) -> RuleResult:
    """TokenAndPositionEmbedding: its ReversibleEmbedding and PositionEmbedding, summed."""
    x = call.positional_inputs()[0] if call.positional_inputs() else None
    if x is None or len(x) != 1:
        raise ValueError(f"{call.describe()}: expected token ids of shape (sequence,)")
    cfg = call.config
    parts = Composite(call)
    table = {"input_dim": cfg["vocabulary_size"], "output_dim": cfg["embedding_dim"],
             "tie_weights": cfg.get("tie_weights", True)}
    tokens = parts.run(reversible_embedding_rule, "token_embedding", "ReversibleEmbedding",
                       table, [x], call.input_values[:1])
    at = parts.run(position_embedding_rule, "position_embedding", "PositionEmbedding",
                   {"sequence_length": cfg["sequence_length"]}, [tokens])
    return parts.result([parts.run(add_rule, "add", "Add", {}, [tokens, at])])


# -- transformer layers ------------------------------------------------------------------------


class _Transformer:
    """Labels one TransformerEncoder / TransformerDecoder call, block by block."""

    def __init__(self, call: RuleCall, x: TensorLabels):
        cfg = call.config
        self.parts = Composite(call)
        self.normalize_first = bool(cfg.get("normalize_first", False))
        self.norm = {"axis": -1, "epsilon": float(cfg.get("layer_norm_epsilon", 1e-5))}
        self.heads = int(cfg["num_heads"])
        self.intermediate = {"units": int(cfg["intermediate_dim"]),
                             "activation": cfg.get("activation", "relu")}
        self.hidden = x[-1].length
        if not self.hidden or self.hidden < self.heads:
            raise ValueError(f"hidden width {self.hidden} for {self.heads} heads")
        self.branch_outputs: list[str] = []  # sublayers whose 0 makes a residual branch 0

    def residual(self, x: TensorLabels, norm: str, branch) -> TensorLabels:
        """x + branch(LN(x)) when normalizing first, else LN(x + branch(x))."""
        run = self.parts.run
        if self.normalize_first:
            h = run(layer_normalization_rule, norm, "LayerNormalization", self.norm, [x])
            return run(add_rule, "add", "Add", {}, [x, branch(h)])
        total = run(add_rule, "add", "Add", {}, [x, branch(x)])
        return run(layer_normalization_rule, norm, "LayerNormalization", self.norm, [total])

    def attend(self, attribute: str, context: TensorLabels | None = None):
        """The attention branch of sublayer `attribute` (self-attention, or cross-attention
        over `context`); keras-hub gives it key_dim = value_dim = hidden // heads."""
        def branch(h: TensorLabels) -> TensorLabels:
            mha = {"num_heads": self.heads, "key_dim": self.hidden // self.heads}
            out = self.parts.run(multi_head_attention_rule, attribute, "MultiHeadAttention",
                                 mha, [h, h if context is None else context])
            self.branch_outputs.append(f"{attribute}/output_dense")
            return self.parts.run(passthrough_rule, "dropout", "Dropout", {}, [out])
        return branch

    def feedforward(self, h: TensorLabels) -> TensorLabels:
        run = self.parts.run
        h = run(dense_rule, "_feedforward_intermediate_dense", "Dense", self.intermediate, [h])
        out = run(dense_rule, "_feedforward_output_dense", "Dense", {"units": self.hidden}, [h])
        self.branch_outputs.append("_feedforward_output_dense")
        return run(passthrough_rule, "dropout", "Dropout", {}, [out])

    def result(self, x: TensorLabels, out: TensorLabels) -> RuleResult:
        """The layer's result. Pre-LayerNorm layers start as the identity with every residual
        branch's last projection at 0; post-LayerNorm layers cannot."""
        if self.normalize_first:
            values = {w.role: ZEROS for w in self.parts.weights.values()
                      if w.role.rsplit("/", 1)[0] in self.branch_outputs}
            identity = Start("identity", values, [x])
        else:
            identity = Start("identity", refused=(
                "it normalises after each residual sum (normalize_first=False), so its output "
                "LayerNorm(x + f(x)) is not x even with every branch f at 0"))
        return self.parts.result([out], starts={"identity": identity})


def transformer_encoder_rule(call: RuleCall) -> RuleResult:
    """TransformerEncoder: self-attention block, then feed-forward block."""
    x = _sequence(call)
    if len(call.output_shapes) > 1 or call.call_kwargs.get("return_attention_scores"):
        raise ValueError("return_attention_scores=True has no rule")
    t = _Transformer(call, x)
    h = t.residual(x, "_self_attention_layer_norm", t.attend("_self_attention_layer"))
    return t.result(x, t.residual(h, "_feedforward_layer_norm", t.feedforward))


def transformer_decoder_rule(call: RuleCall) -> RuleResult:
    """TransformerDecoder: causal self-attention block, cross-attention block (when called
    with an encoder sequence), then feed-forward block. Cached decoding has no rule."""
    x = _sequence(call)
    if any(call.keyword_input(k) is not None or call.call_kwargs.get(k) is not None
           for k in ("self_attention_cache", "cross_attention_cache")):
        raise ValueError("cached decoding has no rule")
    positional = call.positional_inputs()
    context = call.keyword_input("encoder_sequence")
    if context is None and len(positional) > 1:
        context = positional[1]
    t = _Transformer(call, x)
    h = t.residual(x, "_self_attention_layer_norm", t.attend("_self_attention_layer"))
    if context is not None:
        h = t.residual(h, "_cross_attention_layer_norm",
                       t.attend("_cross_attention_layer", context))
    return t.result(x, t.residual(h, "_feedforward_layer_norm", t.feedforward))


# The settings of a transformer layer that its sublayers' sizes do not show: the feed-forward
# activation, the LayerNorm epsilon and where the LayerNorms sit.
TRANSFORMER_KEYS = ("activation", "layer_norm_epsilon", "normalize_first")

# keras-hub registers its layers as "keras_hub>Name"; files from keras-nlp say "keras_nlp>Name".
for _package in ("keras_hub", "keras_nlp"):
    # keras-hub's own ReversibleEmbedding (before it moved into Keras 3.15) and files of it
    register_rule(f"{_package}>ReversibleEmbedding", reversible_embedding_rule,
                  function_keys=EMBEDDING_KEYS)
    register_rule(f"{_package}>PositionEmbedding", position_embedding_rule)
    register_rule(f"{_package}>TokenAndPositionEmbedding", token_and_position_embedding_rule,
                  function_keys=EMBEDDING_KEYS)
    register_rule(f"{_package}>TransformerEncoder", transformer_encoder_rule,
                  function_keys=TRANSFORMER_KEYS)
    register_rule(f"{_package}>TransformerDecoder", transformer_decoder_rule,
                  function_keys=TRANSFORMER_KEYS)

# The pre-RMSNorm decoder families (Llama, Mistral, Qwen, Qwen3, Gemma) and ViT live in their own
# modules.
from keras_surgery.rules import keras_hub_decoders, keras_hub_vit  # noqa: E402, F401
