"""Playground generation: load a checkpoint once, then stream text pieces as they are sampled.
Built on model.generate; torch is imported only here (the other pages start fast), no Streamlit."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    from model.generate import Loaded

MD_SPECIAL = set("\\`*_{}[]()#+-.!|>~<$&")


def load(step_dir: Path, tokenizer_path: Path, device: str = "auto"):
    """The checkpoint's model in eval mode and the tokenizer it was trained with (model.generate.load_trained):
    its run's copy, or `tokenizer_path` (the home's) when the sha256 matches."""
    from model.generate import load_trained

    return load_trained(Path(step_dir), Path(tokenizer_path), device)


def stream(m: "Loaded", prompt: str, max_new_tokens: int = 100, temperature: float = 0.8,
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


def describe(m: "Loaded") -> str:
    model = m.config.get("train", {}).get("model", {})
    n_params = sum(p.numel() for p in m.model.parameters())
    return (f"{n_params / 1e6:.2f}M parameters · {model.get('n_layer')} layers × {model.get('n_embd')} wide · "
            f"context {model.get('block_size')} · vocab {model.get('vocab_size')} · {m.device}")


def config_of(step_dir: Path) -> dict:
    p = Path(step_dir) / "config.json"
    return json.loads(p.read_text()) if p.is_file() else {}
