"""Speed and memory of the FFN family at equal active FLOPs (``mmoe bench moe``).

Every variant is sized so that its experts do the dense FFN's multiply-adds per token
(:func:`expert_macs_per_token`): top-k MoE with experts of width F_dense / K, expert choice the
same with C = K * N / E tokens per expert, MH-MoE the same over sub-tokens, Mixture of Tokens
with width F_dense * G / E. Each step is one forward and backward pass (gradients set to None
first, as a training step does) on the same (B, T, D) input. Variants are timed interleaved,
round after round, so that a slow phase of the machine hits them all; the median round gives
tokens/s and the ratio to the dense FFN measured in the same run. Peak memory is measured in a
fresh process per variant: the rise of the peak resident set during one step (Linux: the peak
is reset through /proc/self/clear_refs).
With ``transformers`` installed (``pip install 'multimodal_moe[bench]'``), Hugging Face's
``MixtralSparseMoeBlock`` is timed in the same rounds against our ``topk_moe`` with the same
SwiGLU expert shapes: its eager experts (a loop over the experts hit) and, in transformers 5.x,
its ``grouped_mm`` experts (``config._experts_implementation``: sorted rows through
``torch._grouped_mm``, as ours). Unless told otherwise, the benchmark first calls
:func:`multimodal_moe.runtime.keep_freed_memory` (the setting a CPU training process should
use), so that no variant pays for page faults on memory freed by the step before.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from . import runtime
from .layers import DenseFFNConfig, FFNConfig, MixtureOfTokensConfig, MultiHeadMoEConfig, TopKMoEConfig

__all__ = ["bench_moe", "expert_macs_per_token", "moe_variants"]


LAYOUT_VARIANTS = ("top2_of_8", "top2_of_32", "top8_of_64")


def moe_variants(dense_hidden: int, activation: str = "gelu") -> dict[str, FFNConfig]:
    """The benchmarked FFNs, each with the expert multiply-adds of a dense FFN of width
    ``dense_hidden``."""
    topk = dict(activation=activation, z_loss_weight=1e-4, balance_loss_weight=0.01)
    return {
        "dense": DenseFFNConfig(hidden_dim=dense_hidden, activation=activation, sub_ln=False, bias=False),
        "top2_of_8": TopKMoEConfig(hidden_dim=dense_hidden // 2, num_experts=8, top_k=2, **topk),
        "top2_of_32": TopKMoEConfig(hidden_dim=dense_hidden // 2, num_experts=32, top_k=2, **topk),
        "top8_of_64": TopKMoEConfig(hidden_dim=dense_hidden // 8, num_experts=64, top_k=8, **topk),
        # DeepSeekMoE's fine-grained segmentation (arXiv 2401.06066): experts of F/8, one of them shared
        "fine_grained_7_of_63_shared_1": TopKMoEConfig(hidden_dim=dense_hidden // 8, num_experts=63, top_k=7,
                                                       shared_expert_dim=dense_hidden // 8, **topk),
        "expert_choice_2_of_8": TopKMoEConfig(hidden_dim=dense_hidden // 2, num_experts=8, top_k=2,
                                              routing="expert_choice", capacity_factor=1.0,
                                              **{**topk, "balance_loss_weight": 0.0}),
        # auxiliary-loss-free balancing with DeepSeek-V3's sigmoid router (arXiv 2408.15664, 2412.19437)
        "loss_free_sigmoid_top2_of_8": TopKMoEConfig(hidden_dim=dense_hidden // 2, num_experts=8, top_k=2,
                                                     score="sigmoid", renormalize=True, bias_update_rate=1e-3,
                                                     sequence_balance_loss_weight=1e-4,
                                                     **{**topk, "balance_loss_weight": 0.0, "z_loss_weight": 0.0}),
        "mh_moe_h4_top2_of_8": MultiHeadMoEConfig(hidden_dim=dense_hidden // 2, num_experts=8, top_k=2, heads=4,
                                                  **topk),
        "mh_moe_h4_top2_of_32": MultiHeadMoEConfig(hidden_dim=dense_hidden // 2, num_experts=32, top_k=2, heads=4,
                                                   **topk),
        "mot_32_experts_g32": MixtureOfTokensConfig(
            hidden_dim=MixtureOfTokensConfig.flop_matched(dense_hidden, 32, 32), num_experts=32, group_size=32,
            activation=activation),
    }


def expert_macs_per_token(cfg: FFNConfig, dim: int) -> float:
    """Multiply-adds per token in the FFN's experts (MH-MoE's head and merge projections,
    2*D^2 more, are not counted)."""
    matrices = 3 if cfg.activation == "swiglu" else 2
    if isinstance(cfg, DenseFFNConfig):
        return matrices * dim * cfg.hidden_dim
    if isinstance(cfg, MultiHeadMoEConfig):
        return cfg.heads * cfg.experts_per_token * matrices * (dim // cfg.heads) * cfg.hidden_dim
    if isinstance(cfg, TopKMoEConfig):  # and the shared expert every token goes through
        return (cfg.experts_per_token * cfg.hidden_dim + (cfg.shared_expert_dim or 0)) * matrices * dim
    if isinstance(cfg, MixtureOfTokensConfig):
        return cfg.num_experts * matrices * dim * cfg.hidden_dim / cfg.group_size
    raise TypeError(f"no FLOP count for {type(cfg).__name__}")


def _step_fn(module: nn.Module, x_BTD: torch.Tensor, returns_ffn_output: bool = True) -> Callable[[], None]:
    weight_BTD = torch.randn_like(x_BTD)

    def step() -> None:
        for p in module.parameters():
            p.grad = None
        x_BTD.grad = None
        out = module(x_BTD)
        loss = (out.hidden * weight_BTD).sum() + out.aux_loss if returns_ffn_output else (out * weight_BTD).sum()
        loss.backward()

    return step


def _hf_has_grouped_mm() -> bool:
    """Whether transformers offers grouped_mm experts besides its eager loop (5.x, not 4.x)."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:
        return False
    return "grouped_mm" in ALL_EXPERTS_FUNCTIONS.keys()


def _hf_mixtral(dim: int, cfg: TopKMoEConfig, experts_implementation: str = "eager") -> nn.Module:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    hf_cfg = MixtralConfig(hidden_size=dim, intermediate_size=cfg.hidden_dim, num_local_experts=cfg.num_experts,
                           num_experts_per_tok=cfg.top_k, hidden_act="silu", router_jitter_noise=0.0)
    if experts_implementation != "eager":
        hf_cfg._experts_implementation = experts_implementation  # transformers 5.x: the experts' forward
    block = MixtralSparseMoeBlock(hf_cfg)
    with torch.no_grad():
        for p in block.parameters():  # its parameters are created uninitialised
            p.normal_(std=0.02)
    return block


def _timed_rounds(steps: dict[str, Callable[[], None]], rounds: int, progress: bool) -> dict[str, float]:
    """Median seconds per step of each callable, timed interleaved after one warm-up each."""
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    iterator = range(rounds)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="bench moe", unit="round", file=sys.stderr)
    for _ in iterator:
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MiB."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def _measure_step_memory(name: str, batch: int, seq: int, dim: int, dense_hidden: int, tuned: bool) -> None:
    """Child-process body: print the rise of the peak resident set during one step."""
    if tuned:
        runtime.keep_freed_memory()
    torch.manual_seed(0)
    step = _step_fn(moe_variants(dense_hidden)[name].build(dim), torch.randn(batch, seq, dim, requires_grad=True))
    before = _status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
        f.write("5")
    step()
    print(_status_mb("VmHWM") - before)


def _peak_step_memory_mb(name: str, batch: int, seq: int, dim: int, dense_hidden: int,
                         tuned: bool) -> float | None:
    """:func:`_measure_step_memory` in a fresh process (Linux only; None elsewhere)."""
    code = (f"from multimodal_moe.bench import _measure_step_memory\n"
            f"_measure_step_memory({name!r}, {batch}, {seq}, {dim}, {dense_hidden}, {tuned})")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode:
        return None
    return round(float(out.stdout.strip().splitlines()[-1]), 1)


def bench_moe(*, batch: int = 32, seq: int = 128, dim: int = 512, dense_hidden: int = 2048, rounds: int = 7,
              threads: int = 2, memory: bool = True, huggingface: bool = True, progress: bool = False,
              keep_freed_memory: bool = True, compile_backend: str | None = None) -> dict:
    """Forward+backward tokens/s of every variant and its ratio to the dense FFN; see the
    module docstring. With ``compile_backend`` (``inductor``: ``torch.compile``'s default) every
    variant is also timed compiled (``fullgraph``: a graph break fails the benchmark), after a
    warm-up that compiles it, against its eager self. Returns the JSON-ready report."""
    tuned = keep_freed_memory and runtime.keep_freed_memory()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tokens = batch * seq
    x_BTD = torch.randn(batch, seq, dim, requires_grad=True)
    variants = moe_variants(dense_hidden)
    modules = {name: cfg.build(dim) for name, cfg in variants.items()}
    steps = {name: _step_fn(module, x_BTD) for name, module in modules.items()}
    if compile_backend:
        for name, module in modules.items():  # the same weights, compiled
            steps[f"compiled/{name}"] = _step_fn(torch.compile(module, backend=compile_backend, fullgraph=True), x_BTD)
    for name in LAYOUT_VARIANTS:  # the padded (E, C) layout, which fp32 on CUDA takes, vs the grouped one
        padded = variants[name].build(dim)
        padded.dispatch = "padded"
        steps[f"padded/{name}"] = _step_fn(padded, x_BTD)

    hf_status, hf_pairs, hf_grouped = "skipped", {}, {}
    if huggingface:
        try:
            import transformers

            hf_status = transformers.__version__
        except ImportError:
            hf_status, huggingface = "not installed (pip install 'multimodal_moe[bench]')", False
    if huggingface:
        swiglu, grouped_mm = moe_variants(dense_hidden, activation="swiglu"), _hf_has_grouped_mm()
        steps["swiglu/dense"] = _step_fn(swiglu["dense"].build(dim), x_BTD)
        for name in ("top2_of_8", "top2_of_32", "top8_of_64"):
            steps[f"swiglu/{name}"] = _step_fn(swiglu[name].build(dim), x_BTD)
            steps[f"hf_mixtral/{name}"] = _step_fn(_hf_mixtral(dim, swiglu[name]), x_BTD, returns_ffn_output=False)
            hf_pairs[name] = (f"swiglu/{name}", f"hf_mixtral/{name}")
            if grouped_mm:
                steps[f"hf_mixtral_grouped_mm/{name}"] = _step_fn(_hf_mixtral(dim, swiglu[name], "grouped_mm"), x_BTD,
                                                                  returns_ffn_output=False)
                hf_grouped[name] = (f"swiglu/{name}", f"hf_mixtral_grouped_mm/{name}")

    seconds = _timed_rounds(steps, rounds, progress)
    rate = {name: tokens / s for name, s in seconds.items()}
    report = {
        "setup": {"tokens": tokens, "batch": batch, "seq": seq, "dim": dim, "dense_hidden": dense_hidden,
                  "rounds": rounds, "threads": threads, "torch": torch.__version__, "statistic": "median round",
                  "step": "zero grads, forward, backward",
                  "allocator": "glibc, freed memory kept (runtime.keep_freed_memory)" if tuned else "default"},
        "variants": {},
    }
    for name, cfg in variants.items():
        entry = {"tokens_per_s": round(rate[name]), "vs_dense": round(rate[name] / rate["dense"], 3),
                 "expert_macs_per_token": expert_macs_per_token(cfg, dim)}
        if memory:
            entry["peak_step_memory_mb"] = _peak_step_memory_mb(name, batch, seq, dim, dense_hidden, tuned)
        report["variants"][name] = entry
    report["dispatch_layouts"] = {
        "note": "dropless top-k in fp32: grouped (sorted rows, torch._grouped_mm; on CUDA only bf16 has a grouped "
                "kernel, fp32 would copy the offsets to the host) vs padded (2E blocks of N*K/E slots and batched "
                "matmuls, no host sync; what TopKMoE picks for fp32 on CUDA and under torch.compile)",
        "variants": {name: {"grouped_tokens_per_s": round(rate[name]),
                            "padded_tokens_per_s": round(rate[f"padded/{name}"]),
                            "padded_vs_grouped": round(rate[f"padded/{name}"] / rate[name], 3)}
                     for name in LAYOUT_VARIANTS}}
    if compile_backend:
        report["compiled"] = {"backend": compile_backend, "note": "compiled vs eager of the same module, fullgraph "
                              "(no graph break); compilation in the warm-up, not timed", "variants": {
                                  name: {"compiled_tokens_per_s": round(rate[f"compiled/{name}"]),
                                         "compiled_vs_eager": round(rate[f"compiled/{name}"] / rate[name], 3)}
                                  for name in variants}}
    def versus(pairs: dict[str, tuple[str, str]]) -> dict[str, dict[str, float]]:
        return {name: {"ours_tokens_per_s": round(rate[ours]), "hf_tokens_per_s": round(rate[theirs]),
                       "ours_vs_hf": round(rate[ours] / rate[theirs], 3),
                       "ours_vs_dense_swiglu": round(rate[ours] / rate["swiglu/dense"], 3),
                       "hf_vs_dense_swiglu": round(rate[theirs] / rate["swiglu/dense"], 3)}
                for name, (ours, theirs) in pairs.items()}

    report["huggingface_mixtral_eager"] = {"transformers": hf_status, "variants": versus(hf_pairs)}
    report["huggingface_mixtral_grouped_mm"] = {
        "transformers": hf_status if hf_grouped or not hf_pairs else f"{hf_status}: no grouped_mm experts (5.x has "
                                                                     f"them)",
        "variants": versus(hf_grouped)}
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mmoe bench moe", description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--dense-hidden", type=int, default=2048)
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant peak-memory processes")
    p.add_argument("--no-hf", action="store_true", help="skip the Hugging Face Mixtral comparison")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="also time every variant under torch.compile (default backend: inductor), vs eager")
    p.add_argument("--default-allocator", action="store_true",
                   help="leave glibc's malloc as it is (freed large blocks go back to the kernel)")
    args = p.parse_args(argv)
    report = bench_moe(batch=args.batch, seq=args.seq, dim=args.dim, dense_hidden=args.dense_hidden,
                       rounds=args.rounds, threads=args.threads, memory=not args.no_memory,
                       huggingface=not args.no_hf, progress=True,
                       keep_freed_memory=not args.default_allocator, compile_backend=args.compile)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
