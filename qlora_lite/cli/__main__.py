"""``python -m qlora_lite.cli``: the same command line as ``qlora-lite`` (what ``accelerate launch -m`` runs)."""

from qlora_lite.cli import main

main()
