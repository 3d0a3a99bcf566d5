"""Attention: scaled dot-product attention with XLA and Pallas implementations."""
