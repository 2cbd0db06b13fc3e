"""The model a command works with: its folder and files, the base loaded frozen in 4/8/16 bits (every
bitsandbytes detail in ``bnb``), our LoRA layers, adapters in the PEFT layout, the compute dtype, and
the loss."""
