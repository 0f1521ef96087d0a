"""Playground generation: load a checkpoint once, then stream text pieces as they are sampled.
Built on model.generate; torch is imported only here (the other pages start fast), no Streamlit."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

EOT = "<|endoftext|>"
MD_SPECIAL = set("\\`*_{}[]()#+-.!|>~<$&")


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    eot: int | None
    config: dict
    device: str


def load(step_dir: Path, tokenizer_path: Path, device: str = "auto") -> Loaded:
    """The checkpoint's model in eval mode and the tokenizer it was trained with (checked by sha256)."""
    import torch

    from model.generate import load_model
    from model.runtime import load_tokenizer

    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    model, cfg = load_model(Path(step_dir), dev)
    tok, sha, vocab = load_tokenizer(tokenizer_path)
    if vocab != model.config.vocab_size:
        raise ValueError(f"{tokenizer_path}: vocab size {vocab} differs from {model.config.vocab_size} "
                         f"of checkpoint {step_dir}")
    want = cfg.get("tokenizer_sha256")
    if want and want != sha:
        raise ValueError(f"{tokenizer_path}: sha256 {sha[:12]} differs from the tokenizer checkpoint "
                         f"{step_dir} was trained with ({want[:12]})")
    return Loaded(model, tok, tok.token_to_id(EOT), cfg, dev)


def stream(m: Loaded, prompt: str, max_new_tokens: int = 100, temperature: float = 0.8,
           top_k: int | None = 50, top_p: float | None = None, seed: int | None = None) -> Iterator[str]:
    """Yield the continuation of `prompt` piece by piece; stops at <|endoftext|> or the length."""
    from model.generate import TextStream, sample

    ids = m.tokenizer.encode(prompt).ids if prompt else []
    if not ids:
        ids = [m.eot] if m.eot is not None else [0]  # no prompt: start a fresh document
    text = TextStream(m.tokenizer)
    for t in sample(m.model, ids, max_new_tokens, temperature, top_k or None,
                    top_p if top_p and top_p < 1.0 else None, seed, stop_id=m.eot):
        if t == m.eot:
            break
        piece = text.push(t)
        if piece:
            yield piece
    tail = text.flush()
    if tail:
        yield tail


def markdown_literal(pieces: Iterator[str]) -> Iterator[str]:
    """Model text shown as typed by a Markdown renderer (st.write_stream): escaped char by char,
    which stays correct across piece boundaries, with line breaks kept."""
    for piece in pieces:
        yield "".join("\\" + ch if ch in MD_SPECIAL else ("  \n" if ch == "\n" else ch) for ch in piece)


def describe(m: Loaded) -> str:
    model = m.config.get("train", {}).get("model", {})
    n_params = sum(p.numel() for p in m.model.parameters())
    return (f"{n_params / 1e6:.2f}M parameters · {model.get('n_layer')} layers × {model.get('n_embd')} wide · "
            f"context {model.get('block_size')} · vocab {model.get('vocab_size')} · {m.device}")


def config_of(step_dir: Path) -> dict:
    p = Path(step_dir) / "config.json"
    return json.loads(p.read_text()) if p.is_file() else {}
