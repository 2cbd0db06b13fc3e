"""The training recipe: the accelerate loop, its batches, optimizer and schedule, metrics and loss plot,
multi-process launch and FSDP, and the memory estimate with the checkpoint policy it chooses."""
