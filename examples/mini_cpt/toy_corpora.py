#!/usr/bin/env python3
"""Tiny corpora in the layout of ``examples/data/prepare_corpora.py``, for the toy study.

The CPU test (``tests/test_mini_cpt.py``) and a by-hand toy run need the pipeline's inputs
without the network: English is the Moby-Dick chapters shipped in
``examples/data/tiny_corpus`` (chapters 1-28 train, 29-31 held out); the "base tokenizer"
(the stand-in for Llama-2's) is a 512-piece BPE trained on that English; Chinese is
synthetic: per domain, a first-order Markov chain over two-character words drawn from a
domain's own range of CJK characters, so each domain is learnable and distinct.

    python examples/mini_cpt/toy_corpora.py OUT_DIR
    MINI_CPT_TOY=1 python examples/mini_cpt/prepare.py --corpora OUT_DIR --output-dir D
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from settings import REPO, ZH_DOMAINS

sys.path.insert(0, str(REPO / "tools"))
import train_tokenizer  # noqa: E402

TINY_CORPUS = REPO / "examples" / "data" / "tiny_corpus"
BASE_VOCAB = 512
WORDS_PER_DOMAIN = 40
SUCCESSORS = 4  # each word is followed by one of 4 words: a learnable chain
TRAIN_DOCS, HELDOUT_DOCS = 60, 6


def chinese_documents(domain: int, count: int, rng: random.Random) -> list[str]:
    """``count`` documents of domain ``domain``: sentences of Markov-chained words."""
    first = 0x4E00 + 50 * domain  # domains share a few characters with their neighbours
    chars = [chr(first + i) for i in range(60)]
    words = ["".join(rng.sample(chars, 2)) for _ in range(WORDS_PER_DOMAIN)]
    successors = {w: rng.sample(words, SUCCESSORS) for w in words}
    docs = []
    for _ in range(count):
        sentences = []
        for _ in range(rng.randint(3, 8)):
            word = rng.choice(words)
            sentence = [word]
            for _ in range(rng.randint(4, 12)):
                word = rng.choice(successors[word])
                sentence.append(word)
            sentences.append("".join(sentence) + rng.choice("，。"))
        docs.append("".join(sentences))
    return docs


def write(path: Path, docs: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")


def build(out: Path, seed: int = 1234) -> None:
    rng = random.Random(seed)
    chapters = sorted(TINY_CORPUS.glob("moby_dick_ch*.txt"))
    english = {"train": chapters[:28], "heldout": chapters[28:]}
    for split, files in english.items():
        write(out / "en" / f"{split}.txt", [f.read_text(encoding="utf-8").strip() for f in files])
    for i, domain in enumerate(ZH_DOMAINS):
        docs = chinese_documents(i, TRAIN_DOCS + HELDOUT_DOCS, rng)
        write(out / "zh" / "train" / f"{domain}.txt", docs[:TRAIN_DOCS])
        write(out / "zh" / "heldout" / f"{domain}.txt", docs[TRAIN_DOCS:])
    status = train_tokenizer.main(["--input", str(out / "en" / "train.txt"), "--output-dir",
                                   str(out / "tokenizer" / "llama2"), "--vocab-size",
                                   str(BASE_VOCAB)])
    if status:
        raise SystemExit(status)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: {sys.argv[0]} OUT_DIR")
    build(Path(sys.argv[1]))
