"""Names of every ONNX graph, input and output: defined once, computed by scheme.

The exporter writes graphs with these names; the runtime binds buffers by them.
Torch-free.
"""

from __future__ import annotations

from collections.abc import Sequence

# Graph files in an export folder.
LOWER_GRAPH = "lower.onnx"  # layers 0..k-1 on token embeddings -> cutoff states
UPPER_GRAPH = "upper.onnx"  # layers k..L-1 + final norm (-> top states) + LM head on the last num_logits rows
DRAFTER_GRAPH = "drafter.onnx"  # one AlignmentHead step -> pseudo cutoff state
DRAFT_HEAD_GRAPH = "draft_head.onnx"  # adapter + final norm + draft LM head on one (exact or pseudo) state
GRAPHS = (LOWER_GRAPH, UPPER_GRAPH, DRAFTER_GRAPH, DRAFT_HEAD_GRAPH)  # every graph of an export folder
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SHARED_WEIGHTS = "shared_weights.bin"  # external data holding weights used by several graphs
SHARED_WEIGHTS_INDEX = "shared_weights.json"  # name -> dtype, shape, offset, graphs (spaf_edge.core.shared_weights)
EMBEDDINGS = "embeddings.bin"  # raw [V, H] token embedding rows (export dtype); the runtime reads rows
DRAFT_VOCAB = "draft_vocab.npy"  # int64 [V_d] token ids of the draft vocabulary (absent = all)

# Inputs.
INPUTS_EMBEDS = "inputs_embeds"  # float [1, S, H]: embedding rows of the tokens (read from EMBEDDINGS)
SEQLENS_K = "seqlens_k"  # int32 [1]: past_length + S - 1 (GroupQueryAttention convention)
TOTAL_SEQUENCE_LENGTH = "total_sequence_length"  # int32 []: past_length + S
CUTOFF_HIDDEN = "cutoff_hidden"  # float [1, S, H]: output of lower, input of upper
NUM_LOGITS = "num_logits"  # int64 [1]: upper input n, logits of the last n positions only (0 <= n <= S)
# Stack inputs of a draft tree (format 6): a chain passes P .. P+S-1 and zeros.
TREE_POSITIONS = "tree_positions"  # int64 [1, S]: rotary position of each row, P + its depth
TREE_BIAS = "tree_bias"  # float [1, 1, S, S]: additive mask among the rows, 0 where the key is an ancestor-or-self
TOKEN_EMBEDS = "token_embeds"  # float [1, 1, H]: drafter input, the embedding of the previous draft d_{j-1}
PREV_HIDDEN = "prev_hidden"  # float [1, 1, H]: drafter input h̄(t)
DRAFT_HIDDEN = "draft_hidden"  # float [1, S, H]: draft-head input, exact h or pseudo ĥ (S = 1 unless it attends)
PREV_TOP = "prev_top"  # float [1, S, H]: draft-head input f̄ (only for adapters that read the top state)
ADAPTER_KV = "adapter"  # the "layer" of an attending adapter's KV cache in the draft head: past_key(ADAPTER_KV)

# Outputs.
DRAFT_LOGITS = "draft_logits"  # float32 [1, 1, V_d]: head(a(h, f)) over the draft vocabulary
DRAFTED_TOP = "drafted_top"  # float [1, 1, H]: final_norm(a(h, f)), the next chained draft step's prev_top
LOGITS = "logits"  # float32 [1, n, V]: positions P+S-n .. P+S-1 (n = num_logits)
TOP_HIDDEN = "top_hidden"  # float [1, S, H]: post-final-norm states (the LM head's input; a fusing adapter's fusion)
PSEUDO_HIDDEN = "pseudo_hidden"  # float [1, 1, H]: drafter output ĥ(t+1)


def past_key(layer: int | str) -> str:
    return f"past_key_values.{layer}.key"  # [1, kv_heads, max_length, head_dim]


def past_value(layer: int | str) -> str:
    return f"past_key_values.{layer}.value"


def present_key(layer: int | str) -> str:
    return f"present.{layer}.key"  # same buffer as past_key(layer) at run time


def present_value(layer: int | str) -> str:
    return f"present.{layer}.value"


def kv_names(layers: Sequence[int | str]) -> list[tuple[str, str, str, str]]:
    """(past_key, past_value, present_key, present_value) per layer, in layer order."""
    return [(past_key(i), past_value(i), present_key(i), present_value(i)) for i in layers]
