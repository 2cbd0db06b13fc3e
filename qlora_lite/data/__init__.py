"""The data stage: a data source (JSONL, JSON, Parquet, CSV, datasets folder, hub id) -> mapped and
validated records -> tokenized examples with loss masks (cached) -> packed, padded batches."""
