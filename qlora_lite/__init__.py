"""qlora-lite: fine-tune LLMs with QLoRA on one consumer machine.

One subpackage per stage of the data flow (README, "How the code is laid out"): ``cli`` runs a recipe
(``train``, ``merge``, ``gguf``, ``inference``, ``demo``) on the core (``model``, ``data``,
``checkpoint``) and the ``kernels`` and ``storage`` below it. Import the pieces you need from their
modules (``qlora_lite.model.build``, ``qlora_lite.train.loop``, ...); importing the package itself stays
cheap so ``qlora-lite --help`` is fast.
"""

__version__ = "0.1.0"
