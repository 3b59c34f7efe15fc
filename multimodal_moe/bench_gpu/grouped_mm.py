"""The ``grouped_mm`` section of ``mmoe bench gpu``: :func:`~multimodal_moe.layers.experts.grouped_matmul`
and :class:`~multimodal_moe.layers.experts.GroupedExperts` in bf16 against a loop over experts of
``torch.mm`` in fp32 on the same values (experts without rows included), and the grouped path's
speed against the loop."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ..layers.experts import GroupedExperts, grouped_matmul
from .harness import Plan, Sizes, each, median_seconds

__all__ = ["loop_experts", "loop_matmul", "section"]

GROUPED_RTOL = 2e-2  # bf16 grouped matmul vs the fp32 loop, relative to the largest reference value


def loop_matmul(x_MK: torch.Tensor, w_EKN: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """The oracle of :func:`grouped_matmul`: ``counts[e]`` rows at a time times expert e's matrix."""
    rows = x_MK.split(counts)
    return torch.cat([torch.mm(rows[e], w_EKN[e]) for e in range(len(counts))])


def loop_experts(x_MD: torch.Tensor, w1_EDF: torch.Tensor, w2_EFD: torch.Tensor, counts: list[int],
                 scale_M: torch.Tensor) -> torch.Tensor:
    """The oracle of a GELU :class:`GroupedExperts`: each expert's MLP on its rows, times the gates."""
    hidden = F.gelu(loop_matmul(x_MD, w1_EDF, counts))
    return loop_matmul(hidden, w2_EFD, counts) * scale_M[:, None]


def _counts(rows: int, experts: int, generator: torch.Generator) -> list[int]:
    """Rows per expert, at random, with the second and last expert given none."""
    chosen = torch.randint(0, experts - 2, (rows,), generator=generator)
    counts = torch.bincount(chosen, minlength=experts - 2).tolist()
    return [counts[0], 0, *counts[1:], 0]


def _offsets(counts: list[int], device: torch.device) -> torch.Tensor:
    """Where each expert's rows end, as :func:`grouped_matmul` takes them (int32)."""
    return torch.tensor(counts).cumsum(0).to(device, torch.int32)


def _compare(run: Callable[..., torch.Tensor], oracle: Callable[..., torch.Tensor], inputs: dict[str, torch.Tensor],
             counts: list[int], dtype: torch.dtype, autocast: bool = False) -> dict[str, Any]:
    """Forward and gradients of ``run`` on ``inputs`` (cast to ``dtype``) against ``oracle`` in fp32
    on the same values: the largest error of each, relative to the largest reference value."""
    device = next(iter(inputs.values())).device
    ours = {k: v.to(dtype).requires_grad_() for k, v in inputs.items()}
    ref = {k: v.detach().float().requires_grad_() for k, v in ours.items()}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        out = run(**ours)
    expected = oracle(**ref)
    upstream = torch.randn(expected.shape, generator=torch.Generator(device).manual_seed(1), device=device)
    (out.float() * upstream).sum().backward()
    (expected * upstream).sum().backward()
    pairs = {"forward": (out, expected), **{f"grad_{k}": (ours[k].grad, ref[k].grad) for k in ours}}
    errors = {name: {"max_abs_error": (a.float() - b).abs().max().item(), "max_abs_reference": b.abs().max().item()}
              for name, (a, b) in pairs.items()}
    empty = [e for e, n in enumerate(counts) if n == 0]
    zero_grads = max((ours[k].grad[empty].abs().max().item() for k in ours if ours[k].ndim == 3), default=0.0)
    ok = all(e["max_abs_error"] <= GROUPED_RTOL * e["max_abs_reference"] for e in errors.values())
    return {"ok": ok and zero_grads == 0.0, "output_dtype": str(out.dtype).removeprefix("torch."), "errors": errors,
            "empty_experts_max_abs_weight_grad": zero_grads}


def _grouped_speed(sizes: Sizes, device: torch.device, plan: Plan) -> dict[str, Any]:
    """Forward+backward rows/s of bf16 :class:`GroupedExperts` and of the same weights in a loop."""
    g = torch.Generator().manual_seed(2)
    counts = torch.bincount(torch.randint(0, sizes.grouped_experts, (sizes.grouped_rows,), generator=g),
                            minlength=sizes.grouped_experts)
    experts = GroupedExperts(sizes.grouped_experts, sizes.grouped_dim, sizes.grouped_hidden, "gelu").to(
        device, torch.bfloat16)
    x_MD = torch.randn(sizes.grouped_rows, sizes.grouped_dim, generator=g).to(device, torch.bfloat16)
    x_MD.requires_grad_()
    scale_M = torch.rand(sizes.grouped_rows, generator=g).to(device, torch.bfloat16)
    offsets_E, counts_list = _offsets(counts.tolist(), device), counts.tolist()

    def grouped() -> None:
        experts.zero_grad(set_to_none=True)
        experts(x_MD, offsets_E, scale_M).sum().backward()

    def loop() -> None:
        experts.zero_grad(set_to_none=True)
        loop_experts(x_MD, experts.w1_EDF, experts.w2_EFD, counts_list, scale_M).sum().backward()

    seconds = {name: median_seconds(step, device, plan.bench_warmup, plan.bench_steps)
               for name, step in (("grouped", grouped), ("loop", loop))}
    return {"ok": True, "rows": sizes.grouped_rows, "dim": sizes.grouped_dim, "hidden": sizes.grouped_hidden,
            "experts": sizes.grouped_experts, "dtype": "bfloat16", "step": "forward + backward",
            "note": "rows are (token, expert) assignments: at top-2, tokens/s is half the rows/s",
            **{f"{name}_rows_per_s": round(sizes.grouped_rows / s) for name, s in seconds.items()},
            "grouped_vs_loop": round(seconds["loop"] / seconds["grouped"], 3)}


def _matmul_case(counts: list[int], K: int, N: int, device: torch.device, g: torch.Generator) -> dict[str, Any]:
    """:func:`grouped_matmul` in bf16 on (M, K) rows and E (K, N) matrices against :func:`loop_matmul`."""
    offsets_E = _offsets(counts, device)
    inputs = {"x_MK": torch.randn(sum(counts), K, generator=g).to(device),
              "w_EKN": (torch.randn(len(counts), K, N, generator=g) / K ** 0.5).to(device)}
    return _compare(lambda x_MK, w_EKN: grouped_matmul(x_MK, w_EKN, offsets_E),
                    lambda **t: loop_matmul(counts=counts, **t), inputs, counts, torch.bfloat16)


def _experts_case(counts: list[int], D: int, hidden: int, dtype: torch.dtype, autocast: bool, device: torch.device,
                  g: torch.Generator) -> dict[str, Any]:
    """A GELU :class:`GroupedExperts` (its weights in ``dtype``, optionally under bf16 autocast)
    with gates against :func:`loop_experts`."""
    module = GroupedExperts(len(counts), D, hidden, "gelu").to(device)
    offsets_E = _offsets(counts, device)
    inputs = {"x_MD": torch.randn(sum(counts), D, generator=g).to(device), "w1_EDF": module.w1_EDF.detach(),
              "w2_EFD": module.w2_EFD.detach(), "scale_M": torch.rand(sum(counts), generator=g).to(device)}

    def ours(x_MD, w1_EDF, w2_EFD, scale_M):  # the module with the compared tensors as its weights
        return torch.func.functional_call(module, {"w1_EDF": w1_EDF, "w2_EFD": w2_EFD}, (x_MD, offsets_E, scale_M))

    return _compare(ours, lambda **t: loop_experts(counts=counts, **t), inputs, counts, dtype, autocast)


def section(args: argparse.Namespace, device: torch.device, plan: Plan, deadline: float) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    counts = _counts(600, 8, g)
    cases = {  # widths: multiples of 16 bytes in bf16 (torch._grouped_mm's alignment), and not
        "grouped_matmul_bf16": lambda: _matmul_case(counts, 128, 192, device, g),
        "grouped_matmul_bf16_unaligned": lambda: _matmul_case(counts, 60, 90, device, g),
        "grouped_experts_bf16": lambda: _experts_case(counts, 128, 192, torch.bfloat16, False, device, g),
        # the trainer's case: fp32 weights under bf16 autocast (output_dtype says what the experts ran in)
        "grouped_experts_fp32_autocast": lambda: _experts_case(counts, 128, 192, torch.float32, True, device, g),
    }
    out: dict[str, Any] = {"tolerance": f"max abs error <= {GROUPED_RTOL} x max abs reference; the weight "
                                        "gradients of experts without rows exactly 0",
                           "oracle": "loop over experts of torch.mm in fp32 on the same values",
                           "rows_per_expert": counts}
    cases["speed"] = lambda: _grouped_speed(Sizes.resolve(args, device), device, plan)
    results = each("grouped_mm", cases, deadline, lambda r: f"grouped {r['grouped_vs_loop']}x the loop"
                    if "grouped_vs_loop" in r else f"output {r['output_dtype']}")
    return {"ok": all(r["ok"] for r in results.values()), **out, **results}

