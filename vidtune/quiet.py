"""Known import-time noise of our dependencies, filtered one message at a time.

Installed by ``import vidtune``, before any of these libraries is imported, so a run starts with
nothing on stderr that asks the user to act. Each filter drops exactly one message of one logger
and nothing else from it:

- bitsandbytes (CPU backend, on CPUs with AVX512-BF16) tries the hub package ``kernels`` for a
  4-bit matmul and logs that it cannot; vidtune never runs 4-bit matmuls (Wan refuses NF4/INT4).
- torchao logs each of its optional compiled libraries built for another Python or CUDA
  (``_C_mxfp8``, ``_C_cutlass_90a``); vidtune's int8 weight-only path does not use them.
- torchao registers two enums with torch's pytree, which torch now logs as deprecated.
- diffusers' torchao quantizer cannot find tensor classes torchao 0.18 moved; vidtune loads no
  torchao-serialized checkpoints through diffusers.
"""
from __future__ import annotations

import logging
import re

KNOWN = {
    "bitsandbytes.backends.cpu.ops": r"Failed to load CPU gemm_4bit_forward from kernels-community",
    "torchao": r"Failed to load \S*torchao[/\\]_C\w*\.\S*\.so: ",
    "torch.utils._pytree": r"<enum '\w+'> is an Enum subclass and is now natively supported by torch\.compile",
    "diffusers.quantizers.torchao.torchao_quantizer": r"Unable to import `torchao` Tensor objects",
}


class _DropMessage(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


def install() -> None:
    """Attach the filters to their loggers (idempotent). A logger's filters see the records it
    creates, whatever handlers the library or the user configure later."""
    for name, pattern in KNOWN.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.pattern.pattern == pattern for f in logger.filters):
            logger.addFilter(_DropMessage(pattern))
