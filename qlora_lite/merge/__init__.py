"""Merging an adapter into its base: the per-tensor plan, the streaming writer, and the check of the
merged folder against base + adapter."""
