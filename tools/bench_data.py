"""Data loading: Python-heap peak while reading large sources, and the tokenized cache's second start.

    PYTHONPATH=. python3 tools/bench_data.py      # results for BENCHMARKS.md ("Data loading")

Builds everything locally (the tiny test tokenizer, generated records); nothing is downloaded.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_models import train_tiny_tokenizer  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from qlora_lite.data import dataset as data  # noqa: E402


def peak_mb(path: Path, tokenizer) -> float:
    tracemalloc.start()
    try:
        data.load_dataset(path, tokenizer, max_seq_len=32)
        return tracemalloc.get_traced_memory()[1] / 1e6
    finally:
        tracemalloc.stop()


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-data-"))
    tokenizer = AutoTokenizer.from_pretrained(train_tiny_tokenizer(tmp / "tokenizer"))
    rows = [{"text": f"{i} " + "the quick brown fox " * 1000} for i in range(2000)]  # 40 MB of text
    (tmp / "big.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp / "big.parquet", row_group_size=256)
    pd.DataFrame(rows).to_csv(tmp / "big.csv", index=False)
    for kind in ("jsonl", "parquet", "csv"):
        print(f"peak Python heap, 40 MB of text as {kind}: {peak_mb(tmp / f'big.{kind}', tokenizer):.1f} MB")
    chats = [{"messages": [{"role": "user", "content": f"add {i} and {i + 1} " * 5},
                           {"role": "assistant", "content": f"{i} plus {i + 1} is {2 * i + 1} " * 5}]}
             for i in range(10_000)]
    (tmp / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chats))
    for label, cache in (("tokenize, no cache", None), ("tokenize + write cache", tmp / "cache"),
                         ("from the cache", tmp / "cache")):
        started = time.perf_counter()
        _, stats = data.load_dataset(tmp / "chat.jsonl", tokenizer, cache_dir=cache)
        print(f"10k chat examples, {label}: {time.perf_counter() - started:.2f} s (from cache: {stats.from_cache})")


if __name__ == "__main__":
    main()
