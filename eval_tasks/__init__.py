"""Fine-tuning and evaluation tasks for multimodal_moe (VQA, retrieval, LM evaluation).

Tasks sit on top of ``multimodal_moe`` and ``data_pipelines``; neither imports this package.
Its task kinds (``vqa``, ``retrieval``) are entry points of the ``multimodal_moe.tasks`` group
(``pyproject.toml``): a config or checkpoint that names one imports its module then, in any
process.
"""

from .retrieval import Retrieval, RetrievalConfig
from .vqa import VQA, VQAConfig

__all__ = ["VQA", "Retrieval", "RetrievalConfig", "VQAConfig"]
