"""Kernel families. Each folder holds a Triton implementation and a plain torch reference;
kernels take patterns and know nothing about the papers that produced them."""
