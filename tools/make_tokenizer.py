"""Train the embedded byte-level BPE tokenizer (vocab 1024) on the Python standard library's own sources.

Usage: python tools/make_tokenizer.py [--vocab 1024] [--output deepport/models/tiny/tokenizer.json]
"""
import argparse
import sysconfig
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>"]  # ids 0 and 1: bos / eos


def stdlib_files(limit_bytes: int):
    root = Path(sysconfig.get_paths()["stdlib"])
    total = 0
    for f in sorted(root.glob("*.py")):
        text = f.read_text(encoding="utf-8", errors="ignore")
        total += len(text)
        yield text
        if total > limit_bytes:
            return


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--megabytes", type=float, default=8.0)
    ap.add_argument("--output", default="deepport/models/tiny/tokenizer.json")
    a = ap.parse_args()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=a.vocab, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(stdlib_files(int(a.megabytes * 1e6)), trainer=trainer)
    Path(a.output).parent.mkdir(parents=True, exist_ok=True)
    tok.save(a.output)
    print(f"wrote {a.output}: vocab {tok.get_vocab_size()}")


if __name__ == "__main__":
    main()
