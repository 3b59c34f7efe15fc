"""Fine-tuning and evaluation tasks for multimodal_moe (VQA, retrieval, LM evaluation).

Tasks sit on top of ``multimodal_moe`` and ``data_pipelines``; neither imports this package.
"""
