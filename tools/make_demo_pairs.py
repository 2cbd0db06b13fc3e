"""Derive the demo's preference pairs from its SFT data (examples/data/demo_pairs_{train,eval}.jsonl).

The demo task is "Reverse the words: a b c" -> "c b a". Each pair keeps the prompt, takes the right
answer as chosen and a near miss as rejected: the words echoed in their original order, or the
reversal with two neighbouring words swapped (what a half-trained model writes). The eval pairs come
from the demo's held-out examples.

    python3 tools/make_demo_pairs.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"


def near_miss(words: list[str], rng: random.Random) -> str:
    """A wrong answer close to the right one (``words`` is the right answer)."""
    if rng.random() < 0.5:
        return " ".join(reversed(words))  # the prompt's order: echoed instead of reversed
    i = rng.randrange(len(words) - 1)
    swapped = words[:i] + [words[i + 1], words[i]] + words[i + 2:]
    return " ".join(swapped)


def pairs(path: Path, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for line in path.read_text().splitlines()[:n]:
        user, answer = json.loads(line)["messages"]
        words = answer["content"].split()
        rejected = near_miss(words, rng)
        if rejected == answer["content"]:  # a palindrome of words: no wrong answer to prefer against
            continue
        out.append({"prompt": [user], "chosen": answer["content"], "rejected": rejected})
    return out


def main() -> None:
    for name, source, n, seed in (("demo_pairs_train.jsonl", "demo_train.jsonl", 400, 0),
                                  ("demo_pairs_eval.jsonl", "demo_eval.jsonl", 100, 1)):
        records = pairs(DATA / source, n, seed)
        (DATA / name).write_text("".join(json.dumps(r) + "\n" for r in records))
        print(f"wrote {len(records)} pairs to {DATA / name}")


if __name__ == "__main__":
    main()
