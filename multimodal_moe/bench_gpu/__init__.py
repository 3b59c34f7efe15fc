"""A one-command acceptance run on a GPU (``mmoe bench gpu``): does the toolkit work on CUDA, and how fast?

    mmoe bench gpu [--out gpu.json] [--quick] [--sections presets,grouped_mm,distributed,throughput]
    mmoe bench gpu --device cpu --quick        the same checks on a CPU, at debug sizes (a smoke run)

It prints one JSON object (and writes it to ``--out``): ``device`` (name, compute capability,
torch and CUDA versions, bf16 support, whether xformers imports), one entry per section, each
with its own ``ok``, and a top-level ``ok`` that is true when every requested section ran and
passed (the exit status is then 0, else 1). The sections, a module each:

- ``presets`` (:mod:`.presets`): every ``*debug*`` preset trains 20 steps on the bundled data in
  bf16 autocast through :meth:`Trainer.fit <multimodal_moe.training.Trainer.fit>` (metrics and the
  final checkpoint included): every loss finite, no step skipped, the mean of the last 5 losses
  below that of the first 5, and the checkpoint loads. Then a few fp32 steps from the same seed:
  the first loss (same weights, same batch) must match bf16's within 2e-2, relative.
- ``grouped_mm`` (:mod:`.grouped_mm`): :func:`~multimodal_moe.layers.experts.grouped_matmul` and
  :class:`~multimodal_moe.layers.experts.GroupedExperts` in bf16 against a loop over experts of
  ``torch.mm`` in fp32 on the same values, experts with zero rows included: forward and input and
  weight gradients; the experts also with fp32 weights under bf16 autocast, as the trainer runs
  them; and rows/s of the grouped path against the loop at a realistic shape.
- ``distributed`` (:mod:`.distributed`): under ``torchrun --standalone``, first a process group of
  one started by :mod:`.process_group` itself (``cuda:nccl,cpu:gloo``; ``gloo`` on a CPU):
  ``all_reduce``, ``all_gather_into_tensor`` and ``all_to_all_single`` with uneven splits against
  their expected values, and one fp32 forward and backward of a dropless ``lm/openmoe_debug``
  through DDP, FSDP2 and expert parallelism against the plain model (loss and every gradient
  within 1e-5); then runs of ``mmoe pretrain`` (an LM MoE debug preset) with
  ``train.data_parallel`` ddp and fsdp and with ``train.expert_parallel`` (one process per GPU,
  at most two by default; a single process starts no process group there, which the JSON says).
- ``throughput`` (:mod:`.throughput`): the trainer's whole step (heads, losses, backward,
  clipping, AdamW) of base-size presets on synthetic batches of their task's batch types, bf16
  autocast: s/step, tokens/s, peak memory, active parameters per token and model FLOPs
  utilisation (:mod:`multimodal_moe.flops`); with xformers installed, ``beit3/base`` again on its
  attention.

Each section runs in a process of its own (:mod:`.run`), so that a CUDA error or a hang in one
cannot take the others with it. A section not started when ``--budget-s`` is spent is skipped,
and so is every preset of a section not started by then.
"""

from .grouped_mm import loop_experts, loop_matmul
from .harness import device_info
from .run import main
from .throughput import synthetic_step

__all__ = ["device_info", "loop_experts", "loop_matmul", "main", "synthetic_step"]
