"""Byte-level tokenizer of the HunyuanImage-3.0 test model (no hub access, pure Python).

The special-token interface follows the official Instruct tokenizer (tokenization_hunyuan_image_3.py
setup_special_tokens): ``<name>_token`` / ``<name>_token_id`` attributes (think, end_of_think, recaption,
end_of_recaption, answer, boi, eoi, img, cfg, timestep, guidance, joint_img_sep, ...),
``size_token_id(size)``, ``ratio_token_id(i)``, ``get_all_ratio_token_ids()``, the ratio range
``start_ratio_token_id`` .. ``end_ratio_token_id`` (``<img_ratio_0>`` .. ``<img_ratio_32>``) plus
``ratio_token_other_slices`` for the 4 extra Instruct buckets, and ``decode`` keeping special tokens
by default (as a Hugging Face tokenizer does).
"""

from __future__ import annotations

import json
import os
import re

TOKENIZER_FILE = "hy3_byte_tokenizer.json"
BYTE_TOKENS = 256
SPECIAL_TOKENS = [
    "<pad>", "<bos>", "<eos>", "<boi>", "<eoi>", "<img>", "<timestep>", "<guidance>",
    "<think>", "</think>", "<recaption>", "</recaption>", "<answer>", "</answer>",
    "<img_size_1024>", "<cfg>", "<joint_img_sep>", "<timestep_r>",
]
# attribute name -> token, as the official tokenizer names them
NAMED_TOKENS = {
    "boi": "<boi>", "eoi": "<eoi>", "img": "<img>", "cfg": "<cfg>", "timestep": "<timestep>",
    "timestep_r": "<timestep_r>", "guidance": "<guidance>", "joint_img_sep": "<joint_img_sep>",
    "answer": "<answer>", "end_of_answer": "</answer>", "think": "<think>", "end_of_think": "</think>",
    "recaption": "<recaption>", "end_of_recaption": "</recaption>",
}
BASE_RATIO_TOKENS = 33  # <img_ratio_0> .. <img_ratio_32>; Instruct appends 33..36


class HunyuanImage3Tokenizer:
    """Bytes are ids 0..255, special tokens follow, then one ``<img_ratio_i>`` per bucket."""

    def __init__(self, special_tokens: list[str], num_ratio_tokens: int) -> None:
        self.special_tokens = list(special_tokens)
        self.num_ratio_tokens = int(num_ratio_tokens)
        names = self.special_tokens + [f"<img_ratio_{i}>" for i in range(self.num_ratio_tokens)]
        self.token_to_id = {name: BYTE_TOKENS + i for i, name in enumerate(names)}
        self.id_to_token = {i: name for name, i in self.token_to_id.items()}
        names = sorted(self.token_to_id, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(re.escape(n) for n in names) + ")")
        for name, token in NAMED_TOKENS.items():
            setattr(self, f"{name}_token", token)
            setattr(self, f"{name}_token_id", self.token_to_id[token])
        self.start_ratio_token_id = self.ratio_token_id(0)
        self.end_ratio_token_id = self.ratio_token_id(min(self.num_ratio_tokens, BASE_RATIO_TOKENS) - 1)
        extra = self.num_ratio_tokens - BASE_RATIO_TOKENS
        self.ratio_token_other_slices = (
            [(self.ratio_token_id(BASE_RATIO_TOKENS), self.ratio_token_id(self.num_ratio_tokens - 1) + 1)]
            if extra > 0 else []
        )

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

    def get_all_ratio_token_ids(self) -> list[int]:
        return self.ratio_token_ids

    def ratio_token_id(self, ratio_idx: int) -> int:
        return self.token_to_id[f"<img_ratio_{ratio_idx}>"]

    def size_token_id(self, size: int) -> int:
        return self.token_to_id[f"<img_size_{size}>"]

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """UTF-8 bytes; special tokens written in the text (``<think>``) become their ids."""
        ids: list[int] = []
        for i, part in enumerate(self._special_re.split(text)):
            ids.extend([self.token_to_id[part]] if i % 2 else list(part.encode("utf-8")))
        return [self.bos_token_id, *ids] if add_bos else ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        out: list[str] = []
        buf = bytearray()
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
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
