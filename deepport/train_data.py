"""The training corpus: the Python standard library's own sources, tokenized, split by file (deterministic)."""
from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from deepport.core.errors import DeepportError

EOS = 1  # <|end_of_text|> separates files
SKIP_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__"}


def stdlib_files() -> list[Path]:
    """Every *.py under sysconfig's stdlib path, sorted, without test suites and site-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [f for f in root.rglob("*.py") if not SKIP_DIRS & set(f.relative_to(root).parts[:-1])]
    if not files:
        raise DeepportError(f"no *.py files under {root}; training needs the Python standard library sources")
    return sorted(files, key=lambda f: f.relative_to(root).as_posix())


@dataclass
class Corpus:
    train: torch.Tensor  # [N] int64 token stream
    heldout: torch.Tensor
    n_train_files: int = 0
    n_heldout_files: int = 0
    source: str = ""

    def describe(self) -> str:
        return (f"{self.source}: {self.n_train_files} train files ({len(self.train)} tokens), "
                f"{self.n_heldout_files} held-out files ({len(self.heldout)} tokens)")

    def train_batch(self, step: int, batch: int, length: int, seed: int) -> torch.Tensor:
        """Random windows [batch, length]; a function of (seed, step) only, so resuming reproduces the run."""
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        starts = torch.randint(0, len(self.train) - length, (batch,), generator=g)
        return torch.stack([self.train[s:s + length] for s in starts.tolist()])

    def heldout_windows(self, n: int, length: int, seed: int = 0) -> torch.Tensor:
        """n fixed windows [n, length] spread evenly over the held-out stream."""
        if len(self.heldout) < length + n:
            raise DeepportError(f"held-out stream has {len(self.heldout)} tokens, too few for {n} windows of {length}")
        starts = torch.linspace(0, len(self.heldout) - length, n).long().tolist()
        return torch.stack([self.heldout[s:s + length] for s in starts])


def tokenize(texts: list[str], tokenizer) -> torch.Tensor:
    """Concatenated ids of texts, each followed by EOS."""
    out = []
    for enc in tokenizer.encode_batch(texts, add_special_tokens=False):
        out.extend(enc.ids)
        out.append(EOS)
    return torch.tensor(out, dtype=torch.long)


def stdlib_corpus(tokenizer_path=None, heldout_every: int = 20) -> Corpus:
    """Train/held-out split of the stdlib: file i (sorted by relative path) is held out when i % n == n - 1."""
    from tokenizers import Tokenizer

    from deepport.models import TOKENIZER

    tok = Tokenizer.from_file(str(tokenizer_path or TOKENIZER))
    files = stdlib_files()
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    held = [t for i, t in enumerate(texts) if i % heldout_every == heldout_every - 1]
    train = [t for i, t in enumerate(texts) if i % heldout_every != heldout_every - 1]
    root = sysconfig.get_paths()["stdlib"]
    return Corpus(tokenize(train, tok), tokenize(held, tok), len(train), len(held),
                  f"Python stdlib *.py under {root} (no tests, no site-packages)")
