"""Data as it comes: Parquet, CSV, JSON arrays, datasets folders, Parquet shards, hub ids, ShareGPT, field maps.

Every file is written by the library users export with (pandas, pyarrow, datasets), and every source
must give the very examples its JSONL twin gives, and name a bad record by file and row.
"""

import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from qlora_lite.config import load_config
from qlora_lite.data import dataset as data
from qlora_lite.data import sources
from qlora_lite.errors import ConfigError, DataError
from qlora_lite.flag_values import parse_field_map
from qlora_lite.storage.durable import file_sha256

ALPACA = [{"instruction": f"add {a} and {b}", "input": "", "output": str(a + b)} for a, b in [(2, 3), (4, 1), (7, 7)]]
CHAT = [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"add {a} and {b}"},
                      {"role": "assistant", "content": f"{a + b}"}]} for a, b in [(2, 3), (4, 1)]]
SHAREGPT = [{"conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": f"add {a} and {b}"},
                               {"from": "gpt", "value": f"{a + b}"}]} for a, b in [(2, 3), (4, 1)]]


@pytest.fixture
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def reference(tokenizer, tmp_path, rows, **kwargs):
    return data.load_dataset(jsonl(tmp_path / "reference.jsonl", rows), tokenizer, **kwargs)[0]


def test_parquet_csv_and_json_array_give_the_jsonl_examples(tokenizer, tmp_path):
    expected = reference(tokenizer, tmp_path, ALPACA)
    frame = pd.DataFrame(ALPACA)
    frame.to_parquet(tmp_path / "d.parquet")
    frame.to_csv(tmp_path / "d.csv", index=False)  # "5" must stay the text "5", "" an empty input
    frame.to_csv(tmp_path / "d.tsv", index=False, sep="\t")
    (tmp_path / "d.json").write_text(json.dumps(ALPACA, indent=2))
    jsonl(tmp_path / "lines.json", ALPACA)  # the hub often names JSON Lines .json
    for name in ("d.parquet", "d.csv", "d.tsv", "d.json", "lines.json"):
        examples, stats = data.load_dataset(tmp_path / name, tokenizer)
        assert examples == expected, name
        assert (stats.total, stats.kept, stats.format) == (3, 3, "alpaca"), name


def test_csv_quoted_commas_newlines_and_bom(tokenizer, tmp_path):
    rows = [{"instruction": 'say "hi", then\nstop', "output": "hi,\nbye"}, {"instruction": "count", "output": "1,2"}]
    path = tmp_path / "excel.csv"
    pd.DataFrame(rows).to_csv(path, index=False, encoding="utf-8-sig")  # what Excel's "CSV UTF-8" writes
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    assert data.load_dataset(path, tokenizer)[0] == reference(tokenizer, tmp_path, rows)


def test_nested_chat_in_parquet_and_sharegpt_in_every_format(tokenizer, tmp_path):
    expected = reference(tokenizer, tmp_path, CHAT)
    pq.write_table(pa.Table.from_pylist(CHAT), tmp_path / "chat.parquet")
    pq.write_table(pa.Table.from_pylist(SHAREGPT), tmp_path / "sharegpt.parquet")
    (tmp_path / "sharegpt.json").write_text(json.dumps(SHAREGPT))
    for path in (tmp_path / "chat.parquet", tmp_path / "sharegpt.parquet", tmp_path / "sharegpt.json",
                 jsonl(tmp_path / "sharegpt.jsonl", SHAREGPT)):
        examples, stats = data.load_dataset(path, tokenizer)
        assert examples == expected and stats.format == "chat", path.name


def test_sharegpt_roles_user_assistant_and_unknown_roles_name_the_row(tokenizer, tmp_path):
    spelled = [{"conversations": [{"from": "user", "value": "add 2 and 3"}, {"from": "assistant", "value": "5"}]}]
    plain = [{"messages": [{"role": "user", "content": "add 2 and 3"}, {"role": "assistant", "content": "5"}]}]
    assert data.load_dataset(jsonl(tmp_path / "a.jsonl", spelled), tokenizer)[0] == reference(tokenizer, tmp_path, plain)
    bad = [SHAREGPT[0], {"conversations": [{"from": "human", "value": "hi"}, {"from": "gtp", "value": "hello"}]},
           {"conversations": [{"from": "human", "value": 3}]}]
    pq.write_table(pa.Table.from_pylist([SHAREGPT[0], bad[1]]), tmp_path / "bad.parquet")
    with pytest.raises(DataError) as error:
        data.load_dataset(tmp_path / "bad.parquet", tokenizer)
    assert str(error.value).splitlines()[1] == (f"{tmp_path / 'bad.parquet'} row 1: conversations[1].from 'gtp' is "
                                                "not one of human, user, gpt, assistant, system (did you mean 'gpt'?)")
    examples, stats = data.load_dataset(jsonl(tmp_path / "bad.jsonl", bad), tokenizer, skip_bad_lines=True)
    assert (stats.total, stats.kept, len(examples)) == (3, 1, 1)
    assert stats.skipped_lines[1] == f"{tmp_path / 'bad.jsonl'}:3: conversations[0].value must be a string, got a number"


def test_bad_rows_are_named_by_file_and_row_and_skip_bad_lines_works_for_each_format(tokenizer, tmp_path):
    rows = [ALPACA[0], {"instruction": "a", "output": None}, ALPACA[1], {"instruction": "b", "output": 7}]
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows[:3]), path)  # row 1: a null answer
    with pytest.raises(DataError) as error:
        data.load_dataset(path, tokenizer)
    lines = str(error.value).splitlines()
    assert lines[0].startswith(f"1 bad row(s) in {path} (format alpaca; fix them, or pass --skip-bad-lines")
    assert lines[1] == f"{path} row 1: field 'output' must be a string, got null"
    examples, stats = data.load_dataset(path, tokenizer, skip_bad_lines=True)
    assert (stats.total, stats.kept) == (3, 2) and stats.summary().endswith("1 skipped (bad rows)")

    (tmp_path / "d.json").write_text(json.dumps([rows[0], rows[3], "oops"]))
    _, stats = data.load_dataset(tmp_path / "d.json", tokenizer, skip_bad_lines=True)
    assert stats.skipped_lines == [f"{tmp_path / 'd.json'} row 1: field 'output' must be a string, got a number",
                                   f"{tmp_path / 'd.json'} row 2: expected a JSON object, got a string"]

    csv = tmp_path / "d.csv"  # a row with a cell too many, as a hand-edited spreadsheet export has
    csv.write_text('instruction,output\nadd 2 and 3,5\nadd 4 and 1,5,extra\nadd 7 and 7,14\n')
    with pytest.raises(DataError, match=r"a row has 3 field\(s\), the header 2: 'add 4 and 1,5,extra'"):
        data.load_dataset(csv, tokenizer)
    examples, stats = data.load_dataset(csv, tokenizer, skip_bad_lines=True)
    assert (stats.total, stats.kept, len(stats.skipped_lines)) == (3, 2, 1)

    empty_output = tmp_path / "empty.csv"  # an empty answer cell is counted, never silently dropped
    empty_output.write_text("instruction,output\nadd 2 and 3,5\nadd 4 and 1,\n")
    _, stats = data.load_dataset(empty_output, tokenizer)
    assert (stats.total, stats.kept, stats.empty) == (2, 1, 1) and stats.summary().endswith("1 empty")


def test_unreadable_sources_say_what_and_where(tokenizer, tmp_path):
    damaged = tmp_path / "d.parquet"
    damaged.write_bytes(b"PAR1" + bytes(range(256)) * 4)
    with pytest.raises(DataError, match=f"{damaged}: not a readable Parquet file"):
        data.load_dataset(damaged, tokenizer)
    with pytest.raises(DataError, match="no such file or folder"):
        data.load_dataset(tmp_path / "missing.parquet", tokenizer)
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": }\n]')
    with pytest.raises(DataError, match=f"{broken}:3: invalid JSON .*one valid array"):
        data.load_dataset(broken, tokenizer, skip_bad_lines=True)
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes("instruction,output\ncafé,b\n".encode("latin-1"))
    with pytest.raises(DataError, match="save the file as UTF-8"):
        data.load_dataset(latin1, tokenizer)
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="neither written by datasets' save_to_disk .* nor holding .parquet files"):
        data.load_dataset(tmp_path / "folder", tokenizer)
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), empty)
    with pytest.raises(DataError, match="has no examples"):
        data.load_dataset(empty, tokenizer)


def test_datasets_folders_and_splits(tokenizer, tmp_path):
    datasets = pytest.importorskip("datasets")
    expected = reference(tokenizer, tmp_path, ALPACA)
    datasets.Dataset.from_list(ALPACA).save_to_disk(tmp_path / "one")
    assert data.load_dataset(tmp_path / "one", tokenizer)[0] == expected
    both = datasets.DatasetDict({"train": datasets.Dataset.from_list(ALPACA),
                                 "test": datasets.Dataset.from_list(ALPACA[:1] + [{**ALPACA[1], "output": None}])})
    both.save_to_disk(tmp_path / "dict")
    assert data.load_dataset(tmp_path / "dict", tokenizer)[0] == expected
    with pytest.raises(DataError, match=r"no split 'valid'; it has train, test \(choose one with --data-split\)"):
        data.load_dataset(tmp_path / "dict", tokenizer, split="valid")
    with pytest.raises(DataError, match=r"\[test\] row 1: field 'output' must be a string, got null"):
        data.load_dataset(tmp_path / "dict", tokenizer, split="test")


def test_folder_of_parquet_shards_reads_the_split_in_order_and_names_the_shard(tokenizer, tmp_path):
    folder = tmp_path / "repo" / "data"
    folder.mkdir(parents=True)
    rows = ALPACA + [{"instruction": "add 1 and 1", "input": "", "output": "2"}]
    pd.DataFrame(rows[:2]).to_parquet(folder / "train-00000-of-00002.parquet")
    pd.DataFrame([rows[2], {"instruction": "x", "input": "", "output": None}, rows[3]]).to_parquet(
        folder / "train-00001-of-00002.parquet")
    pd.DataFrame(rows[:1]).to_parquet(folder / "test-00000-of-00001.parquet")
    with pytest.raises(DataError, match=f"{folder / 'train-00001-of-00002.parquet'} row 1: field 'output'"):
        data.load_dataset(tmp_path / "repo", tokenizer)
    examples, stats = data.load_dataset(tmp_path / "repo", tokenizer, skip_bad_lines=True)
    assert examples == reference(tokenizer, tmp_path, rows) and (stats.total, stats.kept) == (5, 4)
    test, _ = data.load_dataset(tmp_path / "repo", tokenizer, split="test")
    assert test == reference(tokenizer, tmp_path, rows[:1])
    plain = tmp_path / "plain"  # shards without split names: all of them
    plain.mkdir()
    for i in range(2):
        pd.DataFrame(rows[2 * i:2 * i + 2]).to_parquet(plain / f"part-{i}.parquet")
    assert data.load_dataset(plain, tokenizer)[0] == reference(tokenizer, tmp_path, rows)


def test_hub_id_passes_config_and_split_and_fails_offline_with_advice(tokenizer, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    with pytest.raises(DataError, match="someone/no-such-dataset: no such file or folder, and loading it as a hub "
                                        "dataset failed .offline"):
        data.load_dataset("someone/no-such-dataset", tokenizer)
    asked = []

    def load_dataset(dataset_id, config_name, split):  # what the hub would return, without the network
        asked.append((dataset_id, config_name, split))
        return datasets.Dataset.from_list(ALPACA[:2] + [{"instruction": "x", "input": "", "output": ""}])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    examples, stats = data.load_dataset("org/math", tokenizer, split="validation", config_name="small")
    assert asked == [("org/math", "small", "validation")]
    assert examples == reference(tokenizer, tmp_path, ALPACA[:2]) and stats.empty == 1
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_list([{"question": "q"}]))
    with pytest.raises(DataError, match=r"org/math/small\[train\]: cannot detect the data format.*--field-map"):
        data.load_dataset("org/math", tokenizer, config_name="small")


def test_without_the_datasets_package_folders_and_hub_ids_say_what_to_install(tokenizer, tmp_path, monkeypatch):
    import sys

    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "state.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets raises ImportError
    with pytest.raises(DataError, match=r"saved: reading a folder written by datasets' save_to_disk needs the "
                                        r"datasets package: pip install 'qlora-lite\[datasets\]'"):
        data.load_dataset(tmp_path / "saved", tokenizer)
    with pytest.raises(DataError, match=r"^data/trian: no such file or folder; reading it as a hub dataset id needs"):
        data.load_dataset("data/trian", tokenizer)


def test_field_map_reads_columns_of_other_names(tokenizer, tmp_path):
    rows = [{"question": r["instruction"], "answer": r["output"], "output": "not this"} for r in ALPACA]
    pd.DataFrame(rows).to_csv(tmp_path / "qa.csv", index=False)
    field_map, problems = parse_field_map(" output = answer, instruction=question ")
    assert field_map == {"output": "answer", "instruction": "question"} and not problems
    examples, _ = data.load_dataset(tmp_path / "qa.csv", tokenizer, field_map=field_map)
    assert examples == reference(tokenizer, tmp_path, [{k: r[k] for k in ("instruction", "output")} for r in ALPACA])
    pd.DataFrame([{"question": "q", "reply": "a"}]).to_parquet(tmp_path / "qa.parquet")
    with pytest.raises(DataError, match=r"row 0: missing field 'output' \(--field-map output=answer: the record "
                                        r"has no column 'answer'\)"):
        data.load_dataset(tmp_path / "qa.parquet", tokenizer, field_map=field_map, format="alpaca")
    dialog = [{"dialog": s["conversations"]} for s in SHAREGPT]
    assert data.load_dataset(jsonl(tmp_path / "d.jsonl", dialog), tokenizer, field_map={"conversations": "dialog"})[0] \
        == reference(tokenizer, tmp_path, CHAT)


def test_field_map_flag_and_yaml_mapping_are_checked(tmp_path):
    config_file = tmp_path / "c.yaml"
    config_file.write_text("data:\n  field_map:\n    output: answer\n    instruction: question\n")
    assert load_config(config_file).data.field_map == "output=answer,instruction=question"
    with pytest.raises(ConfigError) as error:
        load_config(None, {"field_map": "answer,outptu=a,output=b,output=c", "report_to": "tensorbord"}).validate()
    message = str(error.value)
    for part in ("'answer' is not FIELD=COLUMN", "'outptu' is not a field qlora-lite reads", "maps 'output' twice",
                 "--report-to 'tensorbord' is not one of none, tensorboard, wandb, mlflow"):
        assert part in message


def test_source_fingerprint_follows_every_kind_of_source(tmp_path):
    path = tmp_path / "d.parquet"
    pd.DataFrame(ALPACA).to_parquet(path)
    first = sources.source_sha256(str(path))
    assert first == file_sha256(path)  # a file's digest is the one JSONL runs always recorded
    pd.DataFrame([*ALPACA[:2], {**ALPACA[2], "output": "15"}]).to_parquet(path)
    assert sources.source_sha256(str(path)) != first
    folder = tmp_path / "shards"
    folder.mkdir()
    for i in range(2):
        pd.DataFrame(ALPACA[i:i + 1]).to_parquet(folder / f"part-{i}.parquet")
    before = sources.source_sha256(str(folder))
    assert sources.source_sha256(str(folder)) == before
    pd.DataFrame(ALPACA[2:]).to_parquet(folder / "part-1.parquet")
    changed = sources.source_sha256(str(folder))
    assert changed != before
    (folder / "part-1.parquet").rename(folder / "part-2.parquet")  # same bytes, another shard name
    assert sources.source_sha256(str(folder)) not in (before, changed)


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "csv"])
def test_a_large_source_is_read_record_by_record(tokenizer, tmp_path, kind):
    """What loading holds is the tokenized examples, not the file: 40 MB of text in 2000 records,
    truncated to 32 tokens each, peaks at a fraction of it in Python allocations."""
    import tracemalloc

    rows = [{"text": f"{i} " + "the quick brown fox " * 1000} for i in range(2000)]  # 20 KB each
    path = tmp_path / f"big.{kind}"
    if kind == "jsonl":
        jsonl(path, rows)
    elif kind == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=256)
    else:
        pd.DataFrame(rows).to_csv(path, index=False)
    size = sum(len(r["text"]) for r in rows)  # the text itself (Parquet compresses it to a few MB)
    assert size > 40_000_000
    del rows
    tracemalloc.start()
    try:
        examples, stats = data.load_dataset(path, tokenizer, max_seq_len=32)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (stats.kept, stats.truncated, len(examples)) == (2000, 2000, 2000)
    assert peak < size / 4, f"peak {peak / 1e6:.1f} MB for {size / 1e6:.1f} MB of text"
