"""Models: the BEiT-3 Multiway encoder and the causal decoder LM, selected by ``model.kind``."""

from .base import ModelConfig, ModelOutput
from .decoder_lm import DecoderLM, DecoderLMConfig
from .multiway_encoder import MultiwayEncoder, MultiwayEncoderConfig

__all__ = ["DecoderLM", "DecoderLMConfig", "ModelConfig", "ModelOutput", "MultiwayEncoder",
           "MultiwayEncoderConfig"]
