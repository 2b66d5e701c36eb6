"""Golden logits from HF transformers and their comparison with the JAX forward."""
