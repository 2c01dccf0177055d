"""The GPU check behind ``python benchmarks/gpu_check.py``: every number the project projects,
measured in one time-boxed command on one CUDA device (or rehearsed on the CPU at toy sizes).

Parts, cheapest and most valuable first; each runs in a process of its own with its own time box,
so a failing or hanging part is recorded and the next one runs:

  kernels  every vidtune_kernels op, Triton vs kernels/reference.py, forward and backward,
           fp32/bf16, odd shapes (flash-attention rule); torch.compile(fullgraph=True) through
           the custom ops                                                   (kernels.py)
  speed    each fused op vs the torch sequence it replaces at Wan 1.3B block shapes, event-timed
           medians, achieved GB/s against the measured copy bandwidth       (kernels.py)
  parity   our Wan vs diffusers' WanTransformer3DModel in bf16, forward and grads, error vs the
           fp32 reference at most 2x diffusers' own                         (model.py)
  step     full-size Wan 2.1 1.3B LoRA training step: vidtune vs diffusers+peft interleaved,
           + TREAD, + chunked FF, + apply_compile; MFU, peak memory vs the planner (model.py)
  offload  the CUDA streamer built with cmake/nvcc, offloaded == resident bit-exact, block offload
           from pinned RAM vs resident on 14B blocks with the overlap ratio (offload.py)
  int8     torchao int8 base vs bf16 on the 1.3B step: memory, time, output SNR (model.py)

``runner`` (standard library only) orchestrates; the part modules import torch lazily.
"""

# (name, module:function, time box in seconds on an H100/H200-class GPU, process start and imports
# included). Estimates until a GPU has run the check; they add up to the 8-minute budget.
PARTS = [
    ("kernels", "kernels:correctness", 100),
    ("speed", "kernels:speed", 45),
    ("parity", "model:parity", 35),
    ("step", "model:step", 160),
    ("offload", "offload:offload", 80),
    ("int8", "model:int8", 60),
]
BUDGET_S = 480
DRY_RUN_BUDGET_S = 1800  # a busy 2-core CI machine; each part's box is 4x its GPU box there
