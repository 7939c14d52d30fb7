"""Sparse attention layers (one file per paper; registered with ``sparsattn.nn.register_layer``)."""
