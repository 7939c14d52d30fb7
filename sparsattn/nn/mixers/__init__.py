"""Approximations of attention and recurrent / convolutional mixers (one file per paper)."""
