"""Fast paths in plain PyTorch: the fused 4-bit LoRA linear, the chunked LM loss, the blocked CPU
attention and selective checkpointing; ``footprint`` holds their numbers for the memory estimate."""
