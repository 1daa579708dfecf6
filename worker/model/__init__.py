"""Backbone, multi-level tokenizer, token filtering, cross-attention scorer, weight converters."""
