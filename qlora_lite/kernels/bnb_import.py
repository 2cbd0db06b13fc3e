"""bitsandbytes, imported without the Hugging Face Hub kernel it fetches on AVX512-BF16 CPUs.

On a CPU with AVX512-BF16, ``import bitsandbytes`` (0.48 and later) calls
``kernels.get_kernel("kernels-community/quantization-bitsandbytes")``: a request to the Hub at import
time and, when it answers, a compiled kernel downloaded and run for bitsandbytes' one-row 4-bit
matmul. Offline it prints a warning that asks the user to install ``kernels`` instead. We use neither
that path's speed (our 4-bit layers dequantize and run one matmul, ``lora_4bit``) nor any code the user
did not ask for, so while bitsandbytes is imported the ``kernels`` package is hidden: bitsandbytes then
takes the kernels it ships, as it does on every other CPU. Every qlora-lite module imports
bitsandbytes from here.
"""

from __future__ import annotations

import logging
import sys


def _import_without_hub_kernels():
    if "bitsandbytes" in sys.modules:  # imported already (by the user or a reference stack): as it is
        import bitsandbytes  # noqa: PLC0415

        return bitsandbytes
    hidden = sys.modules.get("kernels", False)
    sys.modules["kernels"] = None  # ``from kernels import get_kernel`` raises ImportError, which bitsandbytes catches
    cpu_ops = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = cpu_ops.level
    cpu_ops.setLevel(logging.ERROR)  # its "failed to load ... from kernels-community" line
    try:
        import bitsandbytes  # noqa: PLC0415
        import bitsandbytes.functional  # noqa: F401, PLC0415
        import bitsandbytes.optim  # noqa: F401, PLC0415
    finally:
        cpu_ops.setLevel(level)
        if hidden is False:
            del sys.modules["kernels"]
        else:
            sys.modules["kernels"] = hidden
    return bitsandbytes


bnb = _import_without_hub_kernels()
functional = bnb.functional
