"""Fine-tuning and evaluation tasks for multimodal_moe (VQA, retrieval, LM evaluation).

Tasks sit on top of ``multimodal_moe`` and ``data_pipelines``; neither imports this package.
Importing it registers its task kinds (``vqa``, ...) with :class:`multimodal_moe.tasks.TaskConfig`,
so that configs naming them load; the ``mmoe`` command line does so itself.
"""

from .retrieval import Retrieval, RetrievalConfig
from .vqa import VQA, VQAConfig

__all__ = ["VQA", "Retrieval", "RetrievalConfig", "VQAConfig"]
