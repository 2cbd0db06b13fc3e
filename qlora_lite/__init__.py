"""qlora-lite: fine-tune LLMs with QLoRA on one consumer machine.

Import the pieces you need from their stage modules (``qlora_lite.quant``, ``qlora_lite.lora``,
``qlora_lite.adapter``, ...); importing the package itself stays cheap so ``qlora-lite --help`` is fast.
"""

__version__ = "0.1.0"
