"""Build the bundled demo model (qlora_lite/demo/model/) and the demo dataset (qlora_lite/demo/data/).

Everything comes from text this script generates, so the result is ours to ship (Apache-2.0) and
reproducible from a seed. The domain is a small toy world of coloured objects, places and number
words. The base model learns to write sentences about that world and to follow a few chat
instructions (repeat words, name the first/last word, answer colour and counting questions, add
small numbers). It never sees word reversal: that is the skill the demo fine-tune teaches, with
answers that can be checked exactly.

    python3 tools/build_demo_model.py                 # tokenizer + model + data (800 steps, 5-15 min
                                                      # on 2 cores, one thread: same bytes every run)
    python3 tools/build_demo_model.py --data-only     # only regenerate the demo dataset

What was measured while choosing the settings (probe: greedy exact match on fresh questions):
copying appears only once echo documents are in the mix (without them: 0/24 "repeat" after 1200
steps); with them, at lr 1e-3: step 400 repeat 7/24, step 600 15/24 (last word 24/24), step 800
22/24 (24/24). Starting the demo fine-tune (300 LoRA steps) from step 400 gave 30% reversal exact
match, from step 600 92%; the shipped model is step 800 (200 LoRA steps: 0% -> 100%), and running
this script with its defaults rebuilt it byte for byte.

Outputs: ``qlora_lite/demo/model/`` (bf16 safetensors, tokenizer with a chat template,
generation_config) and ``qlora_lite/demo/data/{train,eval}.jsonl`` (chat-format JSONL), which are
also copied to ``examples/data/``.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEED = 1234

COLOURS = "red blue green yellow black white orange purple brown pink grey".split()
SIZES = "big small tiny huge tall short old new soft round".split()
OBJECTS = ("cat dog ball box cup hat car bird fish tree book chair table lamp apple shoe boat kite "
           "frog duck bus key coin sock egg").split()
PLACES = ["on the table", "in the box", "under the chair", "near the tree", "by the door", "in the garden",
          "on the shelf", "next to the lamp", "behind the car", "in the kitchen"]
NAMES = "Tom Anna Sam Lily Ben Mia Max Zoe".split()
NUMBERS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
           "sixteen seventeen eighteen nineteen twenty").split()
WORDS = COLOURS + SIZES + OBJECTS

# Roles are plain-text markers; the end of every assistant turn is the EOS token, so generation
# stops there. The template starts with BOS, which the tokenizer does not add by itself. Content
# follows ": " so that its first word is the same space-prefixed token as inside a sentence: a word
# copied from the question is then the very token the model read, not a different "no-space" one.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<|assistant|>: {{ m['content'] }}{{ eos_token }}\n"
    "{% else %}<|{{ m['role'] }}|>: {{ m['content'] }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>:{% endif %}"
)

MODEL_SHAPE = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)


def plural(word: str) -> str:
    if word == "fish":
        return word
    return word + ("es" if word.endswith(("x", "s", "sh", "ch")) else "s")


def sentence(rng: random.Random) -> str:
    """One plausible sentence about the toy world."""
    c, s, o, p, n = (rng.choice(COLOURS), rng.choice(SIZES), rng.choice(OBJECTS), rng.choice(PLACES),
                     rng.randint(2, 12))
    forms = [
        f"The {s} {c} {o} is {p}.",
        f"There are {NUMBERS[n]} {c} {plural(o)} {p}.",
        f"{rng.choice(NAMES)} has a {s} {c} {o}.",
        f"I see a {c} {o} {p}.",
        f"The {o} is {c} and {s}.",
        f"{rng.choice(NAMES)} put the {c} {o} {p}.",
        f"{NUMBERS[n].capitalize()} and one make {NUMBERS[n + 1]}.",
        f"After {NUMBERS[n]} comes {NUMBERS[n + 1]}.",
    ]
    return rng.choice(forms)


def word_list(rng: random.Random, lo: int = 3, hi: int = 4) -> list[str]:
    return rng.sample(WORDS, rng.randint(lo, hi))


def base_instruction(rng: random.Random) -> tuple[str, str]:
    """A (question, answer) pair for the skills the base model is pretrained on (never reversal)."""
    # Copying skills get most of the weight: they need attention patterns (induction heads) that take
    # a small model the longest to learn, and they are what the reversal fine-tune builds on.
    kind = rng.choices(range(6), weights=(4, 3, 1, 1, 1, 1))[0]
    if kind == 0:
        words = " ".join(word_list(rng, 2, 5))
        return f"Repeat the words: {words}", words
    if kind == 1:
        words = word_list(rng, 2, 5)
        which = rng.choice(["first", "last"])
        return f"Name the {which} word: {' '.join(words)}", words[0 if which == "first" else -1]
    if kind == 2:
        c, o, p = rng.choice(COLOURS), rng.choice(OBJECTS), rng.choice(PLACES)
        return f"The {c} {o} is {p}. What colour is the {o}?", c
    if kind == 3:
        n, o, p = rng.randint(2, 12), rng.choice(OBJECTS), rng.choice(PLACES)
        return f"There are {NUMBERS[n]} {plural(o)} {p}. How many {plural(o)} are there?", NUMBERS[n]
    if kind == 4:
        a = rng.randint(0, 10)
        b = rng.randint(0, 20 - a)
        return f"What is {NUMBERS[a]} plus {NUMBERS[b]}?", NUMBERS[a + b]
    n = rng.randint(0, 19)
    return f"What number comes after {NUMBERS[n]}?", NUMBERS[n + 1]


def chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def render(tokenizer, record: dict) -> str:
    return tokenizer.apply_chat_template(record["messages"], tokenize=False)


def echo_document(rng: random.Random) -> str:
    """A random word list said three times: repeated random sequences are what teaches a small model
    to copy (the "induction" attention pattern) quickly, and every copying skill builds on that."""
    words = " ".join(rng.sample(WORDS, rng.randint(3, 8)))
    return f"{words}. Again: {words}. Again: {words}."


def pretraining_documents(rng: random.Random, tokenizer, n: int, chat_fraction: float = 0.6,
                          echo_fraction: float = 0.25) -> list[str]:
    """Echo documents, chat conversations of one to three turns (rendered by the template) and prose."""
    docs = []
    for _ in range(n):
        draw = rng.random()
        if draw < echo_fraction:
            docs.append(tokenizer.bos_token + echo_document(rng) + tokenizer.eos_token)
        elif draw >= echo_fraction + chat_fraction:
            docs.append(tokenizer.bos_token + " ".join(sentence(rng) for _ in range(rng.randint(2, 6)))
                        + tokenizer.eos_token)
        else:
            messages = []
            for _ in range(rng.randint(1, 3)):
                messages += chat(*base_instruction(rng))["messages"]
            docs.append(tokenizer.apply_chat_template(messages, tokenize=False))
    return docs


def demo_dataset(seed: int = SEED, n_train: int = 2000, n_eval: int = 100) -> tuple[list[dict], list[dict]]:
    """The fine-tuning skill: reverse a list of 3-4 words. Held-out word lists never occur in train."""
    rng = random.Random(seed + 1)
    seen, train, held = set(), [], []
    while len(held) < n_eval or len(train) < n_train:
        words = word_list(rng)
        key = tuple(words)
        if key in seen:
            continue
        seen.add(key)
        record = chat(f"Reverse the words: {' '.join(words)}", " ".join(reversed(words)))
        (held if len(held) < n_eval else train).append(record)
    return train, held


def write_data(out_dir: Path, copy_to: Path | None) -> None:
    train, held = demo_dataset()
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, records in (("train.jsonl", train), ("eval.jsonl", held)):
        (out_dir / name).write_text("".join(json.dumps(r) + "\n" for r in records))
        if copy_to is not None:
            copy_to.mkdir(parents=True, exist_ok=True)
            shutil.copy(out_dir / name, copy_to / f"demo_{name}")
    print(f"wrote {len(train)} train and {len(held)} eval examples to {out_dir}")


def train_tokenizer(vocab_size: int, out_dir: Path):
    """Byte-level BPE on generated text; specials <unk>=0, <s>=1, </s>=2 and no pad token (like many LLMs)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(SEED)
    texts = [sentence(rng) for _ in range(20000)]
    texts += [q + "\n" + a for q, a in (base_instruction(rng) for _ in range(20000))]
    texts += [f"Reverse the words: {' '.join(word_list(rng))}" for _ in range(2000)]
    texts += [echo_document(rng) for _ in range(2000)]
    texts += ["<|user|>:", "<|assistant|>:", "<|system|>:"] * 1000
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   model_max_length=MODEL_SHAPE["max_position_embeddings"])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def token_batches(tokenizer, seq_len: int, batch: int, seed: int, chat_fraction: float):
    """Endless (batch, seq_len) int64 tensors of packed pretraining documents."""
    import torch

    rng = random.Random(seed)
    buffer: list[int] = []
    while True:
        while len(buffer) < seq_len * batch:
            for doc in pretraining_documents(rng, tokenizer, 256, chat_fraction):
                buffer += tokenizer(doc, add_special_tokens=False)["input_ids"]
        chunk, buffer = buffer[: seq_len * batch], buffer[seq_len * batch:]
        yield torch.tensor(chunk, dtype=torch.long).view(batch, seq_len)


def save_model(model, tokenizer, out_dir: Path) -> None:
    """bf16 safetensors, config, generation config and tokenizer (with the chat template)."""
    import torch
    from transformers import GenerationConfig

    copy = type(model)(model.config)
    copy.load_state_dict(model.state_dict())
    copy.to(torch.bfloat16).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    c = model.config
    GenerationConfig(bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.eos_token_id,
                     do_sample=False, max_new_tokens=64).save_pretrained(out_dir)


def probe(model, tokenizer, n: int = 24) -> str:
    """Greedy exact-match on fresh copy-skill questions (repeat, last word): is the base usable yet?"""
    import torch

    rng = random.Random(99)
    scores = {}
    for kind in ("Repeat the words", "Name the last word"):
        correct = 0
        for _ in range(n):
            words = word_list(rng, 2, 5)
            answer = " ".join(words) if kind.startswith("Repeat") else words[-1]
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": f"{kind}: {' '.join(words)}"}],
                                                   tokenize=False, add_generation_prompt=True)
            ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                out = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                     pad_token_id=tokenizer.eos_token_id)
            correct += tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip() == answer
        scores[kind.split()[0].lower()] = f"{correct}/{n}"
    return " ".join(f"{k} {v}" for k, v in scores.items())


def pretrain(tokenizer, steps: int, out_dir: Path, snapshot_every: int = 0, lr: float = 1e-3,
             chat_fraction: float = 0.6) -> None:
    """Train a small LlamaForCausalLM from scratch (bf16 autocast, AdamW) and save it in bf16.

    The learning rate is constant after warmup, so the snapshot written at step k (``--snapshot-every``)
    is exactly the model that ``--steps k`` builds.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=None, **MODEL_SHAPE)
    model = LlamaForCausalLM(config)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {steps} steps")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))
    batches = token_batches(tokenizer, seq_len=128, batch=16, seed=SEED, chat_fraction=chat_fraction)
    start = time.time()
    model.train()
    for step in range(1, steps + 1):
        ids = next(batches)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        schedule.step()
        if step % 50 == 0 or step == 1:
            print(f"step {step:5d}  loss {loss.item():.3f}  {time.time() - start:6.0f}s", flush=True)
        if snapshot_every and step % snapshot_every == 0 and step < steps:
            model.eval()
            print(f"step {step:5d}  probe: {probe(model, tokenizer)}", flush=True)
            save_model(model, tokenizer, out_dir.with_name(f"{out_dir.name}-step{step}"))
            model.train()
    model.eval()
    print(f"final probe: {probe(model, tokenizer)}")
    save_model(model, tokenizer, out_dir)


def smoke_test(out_dir: Path) -> None:
    """Greedy answers of the saved model to a few prompts, to eyeball what it learned."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out_dir)
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.bfloat16)
    for q in ["Repeat the words: red cat big", "What is two plus five?", "Name the last word: cup hat dog",
              "Reverse the words: red cat big"]:
        prompt = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        out = model.generate(ids, max_new_tokens=16, do_sample=False)
        print(f"{q!r} -> {tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)!r}")
    ids = tok(tok.bos_token + "The", add_special_tokens=False, return_tensors="pt")["input_ids"]
    print("prose:", tok.decode(model.generate(ids, max_new_tokens=30, do_sample=False)[0], skip_special_tokens=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "qlora_lite" / "demo" / "model")
    parser.add_argument("--data-out", type=Path, default=ROOT / "qlora_lite" / "demo" / "data")
    parser.add_argument("--examples", type=Path, default=ROOT / "examples" / "data")
    parser.add_argument("--steps", type=int, default=800, help="pretraining steps (16 x 128 tokens each)")
    parser.add_argument("--snapshot-every", type=int, default=0,
                        help="also save OUT-stepK every K steps, with a copy-skill probe (to pick a step count)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (1: the same result on every run on one machine, and robust to busy CPUs)")
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=1e-3, help="pretraining learning rate (constant after warmup)")
    parser.add_argument("--chat-fraction", type=float, default=0.6,
                        help="share of chat documents (plus 25%% echo documents; the rest is prose)")
    parser.add_argument("--data-only", action="store_true", help="only regenerate the demo dataset")
    args = parser.parse_args()
    write_data(args.data_out, args.examples)
    if args.data_only:
        return
    import torch

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    tokenizer = train_tokenizer(args.vocab_size, args.out)
    pretrain(tokenizer, args.steps, args.out, args.snapshot_every, args.lr, args.chat_fraction)
    smoke_test(args.out)
    size = sum(f.stat().st_size for f in args.out.iterdir()) / 1e6
    print(f"wrote {args.out} ({size:.1f} MB)")


if __name__ == "__main__":
    main()
