"""Quantization beyond onnxruntime's quantizer: bias correction and the float-island rules.

- :func:`correct_biases`: empirical per-channel bias correction of a QDQ model;
- :func:`rewrite_weight_bits`: weights re-rounded per layer to 7 or 8 bits (u8s8 saturation without VNNI);
- :func:`float_nodes`: nodes kept float by rule (detector head Concat/Sigmoid/Mul; transformer LayerNorm/Softmax/GELU).
"""

from ._bias import correct_biases
from ._weights import rewrite_weight_bits, set_weight_bits, weight_layers
from ._rules import detection_head_nodes, float_nodes, is_transformer, transformer_nodes

__all__ = ["correct_biases", "rewrite_weight_bits", "set_weight_bits", "weight_layers", "float_nodes", "detection_head_nodes", "transformer_nodes", "is_transformer"]
