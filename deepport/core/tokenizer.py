"""tokenizer.json through the `tokenizers` library."""
from __future__ import annotations

from pathlib import Path

from deepport.core.errors import CheckpointError, DeepportError


class Tokenizer:
    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as _Tok

        try:
            self._tok = _Tok.from_file(str(path))
        except Exception as e:
            raise CheckpointError(f"{path} is not a readable tokenizer.json ({e}); re-download it") from None
        self.path = Path(path)

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer | None":
        f = Path(path) / "tokenizer.json"
        return cls(f) if f.is_file() else None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


def require(tok: Tokenizer | None, where) -> Tokenizer:
    if tok is None:
        raise DeepportError(f"{where} has no tokenizer.json; pass the prompt as token ids or add a tokenizer.json")
    return tok
