"""Building blocks: attention, the FFN interface and its variants, Multiway routing, blocks."""

from .attention import Attention, RotaryEmbedding, attend
from .block import Block, run_blocks
from .ffn import DenseFFN, DenseFFNConfig, FFNConfig, FFNOutput
from .moe import MultiHeadMoE, MultiHeadMoEConfig, TopKMoE, TopKMoEConfig
from .mot import MixtureOfTokens, MixtureOfTokensConfig, topk_from_mot
from .multiway import Multiway

__all__ = ["Attention", "Block", "DenseFFN", "DenseFFNConfig", "FFNConfig", "FFNOutput", "MixtureOfTokens",
           "MixtureOfTokensConfig", "MultiHeadMoE",
           "MultiHeadMoEConfig", "Multiway", "RotaryEmbedding", "TopKMoE", "TopKMoEConfig", "attend", "run_blocks",
           "topk_from_mot"]
