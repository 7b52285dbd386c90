"""Byte-level tokenizer of the HunyuanImage-3.0 test model (no hub access, pure Python)."""

from __future__ import annotations

import json
import os

TOKENIZER_FILE = "hy3_byte_tokenizer.json"
BYTE_TOKENS = 256
SPECIAL_TOKENS = [
    "<pad>", "<bos>", "<eos>", "<boi>", "<eoi>", "<img>", "<timestep>", "<guidance>",
    "<think>", "</think>", "<recaption>", "</recaption>", "<answer>", "</answer>",
    "<img_size_1024>",
]


class HunyuanImage3Tokenizer:
    """Bytes are ids 0..255, special tokens follow, then one ``<img_ratio_i>`` per bucket."""

    def __init__(self, special_tokens: list[str], num_ratio_tokens: int) -> None:
        self.special_tokens = list(special_tokens)
        self.num_ratio_tokens = int(num_ratio_tokens)
        names = self.special_tokens + [f"<img_ratio_{i}>" for i in range(self.num_ratio_tokens)]
        self.token_to_id = {name: BYTE_TOKENS + i for i, name in enumerate(names)}
        self.id_to_token = {i: name for name, i in self.token_to_id.items()}

    @classmethod
    def build(cls, num_ratio_tokens: int) -> HunyuanImage3Tokenizer:
        return cls(SPECIAL_TOKENS, num_ratio_tokens)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> HunyuanImage3Tokenizer:
        with open(os.path.join(os.fspath(path), TOKENIZER_FILE), encoding="utf-8") as f:
            data = json.load(f)
        return cls(data["special_tokens"], data["num_ratio_tokens"])

    def save_pretrained(self, path: str | os.PathLike) -> None:
        data = {
            "type": "hy3-byte-level",
            "byte_tokens": BYTE_TOKENS,
            "special_tokens": self.special_tokens,
            "num_ratio_tokens": self.num_ratio_tokens,
        }
        with open(os.path.join(os.fspath(path), TOKENIZER_FILE), "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)

    def __len__(self) -> int:
        return BYTE_TOKENS + len(self.token_to_id)

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.token_to_id[token]

    @property
    def pad_token_id(self) -> int:
        return self.token_to_id["<pad>"]

    @property
    def bos_token_id(self) -> int:
        return self.token_to_id["<bos>"]

    @property
    def eos_token_id(self) -> int:
        return self.token_to_id["<eos>"]

    @property
    def ratio_token_ids(self) -> list[int]:
        return [self.token_to_id[f"<img_ratio_{i}>"] for i in range(self.num_ratio_tokens)]

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id, *ids] if add_bos else ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        out: list[str] = []
        buf = bytearray()
        for i in ids:
            i = int(i)
            if i < BYTE_TOKENS:
                buf.append(i)
                continue
            if buf:
                out.append(buf.decode("utf-8", errors="replace"))
                buf = bytearray()
            if not skip_special_tokens:
                out.append(self.id_to_token.get(i, ""))
        if buf:
            out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)
