"""The training recipe: the accelerate loop, its batches, optimizer and schedule, metrics, loss plot and
--report-to trackers, multi-process launch and FSDP, and the memory estimate with the checkpoint policy
it chooses."""
