"""Integrations with training frameworks; each is an optional extra (transformers: pip install "nanfuse[hf]")."""
