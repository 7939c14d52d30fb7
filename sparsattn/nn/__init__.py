"""sparsattn.nn: trainable sparse-attention layers and sub-quadratic mixers (one file each).

``list_layers()``, ``get_layer(name, dim, heads, **config)``; the contract is in ``base.py``.
Sparse layers live in ``layers/``, approximations and recurrent mixers in ``mixers/``.
"""
from .base import Layer, get_layer, hyper_parameters, layer_class, list_layers, register_layer

__all__ = ["Layer", "register_layer", "get_layer", "list_layers", "layer_class", "hyper_parameters"]
