"""The data stage: a data file -> validated records -> tokenized examples with loss masks -> packed,
padded batches."""
