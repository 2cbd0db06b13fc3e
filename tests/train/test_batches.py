"""What a run trains and evaluates on: both read through the data stage, each from its own split."""

import pytest
from transformers import AutoTokenizer

from qlora_lite.config import load_config
from qlora_lite.data.tokenize import tokenize_example
from qlora_lite.train.batches import load_training_data


def test_eval_split_of_the_same_dataset_and_field_map_reach_both_loads(tokenizer_dir, tmp_path):
    datasets = pytest.importorskip("datasets")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    train_rows = [{"q": f"add {a} and 1", "a": str(a + 1)} for a in range(6)]
    test_rows = [{"q": "add 9 and 9", "a": "18"}]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(train_rows),
                          "test": datasets.Dataset.from_list(test_rows)}).save_to_disk(tmp_path / "qa")
    config = load_config(None, {"data": str(tmp_path / "qa"), "eval_data": str(tmp_path / "qa"), "eval_split": "test",
                                "field_map": "instruction=q,output=a", "data_cache": "none", "output": "x"})
    train, held = load_training_data(config.validate(), tokenizer)

    def expected(rows):
        return [tokenize_example({"instruction": r["q"], "output": r["a"]}, tokenizer, "alpaca") for r in rows]

    assert train == expected(train_rows) and held == expected(test_rows)
