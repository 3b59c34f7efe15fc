"""Data pipelines for multimodal_moe: webdataset shards, tokenizers, image transforms, masking.

This package never imports model code (``multimodal_moe.models`` / ``multimodal_moe.layers``).
"""
