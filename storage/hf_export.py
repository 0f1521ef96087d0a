"""A checkpoint as a Hugging Face GPT-2 folder: `from_pretrained(DIR)` loads it offline as GPT2LMHeadModel + tokenizer.
Read and written with safetensors' numpy API and json only (no torch), at the price of holding one fp32 copy of
the weights in host memory while the transposed Conv1D layout is built."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from storage.atomic import atomic_replace_dir, tmp_path_for
from storage.checkpoints import WEIGHTS, read_config, trained_tokenizer

EOT = "<|endoftext|>"
# our nn.Linear weights are (out, in); GPT-2's Conv1D keeps (in, out)
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
LAYER_KEYS = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
              "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
              "mlp.c_proj.weight", "mlp.c_proj.bias")


class ExportError(ValueError):
    """One line naming the checkpoint, tokenizer or output folder and what is wrong with it."""


def tokenizer_facts(path: Path) -> tuple[int, int]:
    """(vocabulary size, id of <|endoftext|>) of a `tokenizers` JSON file."""
    d = json.loads(Path(path).read_text())
    ids = set(d["model"]["vocab"].values()) | {t["id"] for t in d.get("added_tokens", [])}
    eot = next((t["id"] for t in d.get("added_tokens", []) if t["content"] == EOT), None)
    if eot is None:
        raise ExportError(f"{path}: the tokenizer has no {EOT} token")
    return max(ids) + 1, eot


def hf_state(sd: dict[str, np.ndarray], m: dict) -> dict[str, np.ndarray]:
    """Our state dict in GPT2LMHeadModel's names and layout; padded vocabulary rows dropped, absent biases
    (bias=False) written as zeros, lm_head left out (tied to wte, as HF ties it on load)."""
    d, out = m["n_embd"], {}

    def get(name: str, shape: tuple) -> np.ndarray:
        if name in sd:
            return sd[name]
        if name.endswith(".bias"):
            return np.zeros(shape, dtype=np.float32)
        raise ExportError(f"{WEIGHTS}: no tensor {name}")

    out["transformer.wte.weight"] = get("transformer.wte.weight", ())[: m["vocab_size"]]
    out["transformer.wpe.weight"] = get("transformer.wpe.weight", ())
    widths = {"attn.c_attn.bias": 3 * d, "mlp.c_fc.bias": 4 * d}
    for i in range(m["n_layer"]):
        for k in LAYER_KEYS:
            t = get(f"transformer.h.{i}.{k}", (widths.get(k, d),))
            out[f"transformer.h.{i}.{k}"] = t.T if k in CONV1D else t
    for k in ("weight", "bias"):
        out[f"transformer.ln_f.{k}"] = get(f"transformer.ln_f.{k}", (d,))
    for name, t in out.items():
        if t.dtype != np.float32:
            raise ExportError(f"{WEIGHTS}: {name} is {t.dtype}; the export expects float32 weights")
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def hf_config(m: dict, vocab: int, eot: int) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": vocab, "n_positions": m["block_size"], "n_embd": m["n_embd"], "n_layer": m["n_layer"],
        "n_head": m["n_head"], "n_inner": None,
        # our MLP runs F.gelu(approximate="tanh"): GPT-2's gelu_new is that formula
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "resid_pdrop": m.get("dropout", 0.0), "embd_pdrop": m.get("dropout", 0.0), "attn_pdrop": m.get("dropout", 0.0),
        "initializer_range": 0.02, "scale_attn_weights": True, "use_cache": True, "tie_word_embeddings": True,
        "bos_token_id": eot, "eos_token_id": eot, "dtype": "float32",
    }


def tokenizer_files(block_size: int) -> dict[str, dict]:
    special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
    return {
        # GPT2TokenizerFast reads tokenizer.json as it is (transformers 4 and 5 alike)
        "tokenizer_config.json": {"tokenizer_class": "GPT2TokenizerFast", **special, "add_prefix_space": False,
                                  "add_bos_token": False, "model_max_length": block_size,
                                  "clean_up_tokenization_spaces": False},
        "special_tokens_map.json": special,
    }


def check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"--out {out}: exists and is not empty (add --force to replace it)")


def export_hf(step_dir: Path, home_tokenizer: Path, out: Path, force: bool = False) -> dict:
    """Write the Hugging Face folder `out` from a complete checkpoint folder and the tokenizer it was trained with
    (its run's copy, else `home_tokenizer` when the sha256 matches), atomically (a temp folder renamed into place);
    returns what was written. Refuses before writing anything: ExportError, TokenizerMismatch, FileNotFoundError."""
    from safetensors.numpy import load_file, save

    step_dir, out = Path(step_dir), Path(out).absolute()
    cfg = read_config(step_dir)
    check_out(out, force)
    tokenizer, _ = trained_tokenizer(step_dir, cfg, home_tokenizer)
    m = cfg["train"]["model"]
    vocab, eot = tokenizer_facts(tokenizer)
    if vocab != m["vocab_size"]:
        raise ExportError(f"{tokenizer}: vocab size {vocab} differs from {m['vocab_size']} of checkpoint {step_dir}")
    tensors = hf_state(load_file(str(step_dir / WEIGHTS)), m)
    data = save(tensors, metadata={"format": "pt"})
    files = {"config.json": hf_config(m, vocab, eot), **tokenizer_files(m["block_size"]),
             "generation_config.json": {"bos_token_id": eot, "eos_token_id": eot}}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(out)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        (tmp / WEIGHTS).write_bytes(data)
        shutil.copyfile(tokenizer, tmp / "tokenizer.json")
        for name, obj in files.items():
            (tmp / name).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
        atomic_replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": str(out), "checkpoint": str(step_dir), "tokenizer": str(tokenizer), "run_id": cfg.get("run_id"),
            "step": cfg.get("step"), "files": sorted([WEIGHTS, "tokenizer.json", *files]), "weights_sha256": hashlib.sha256(data).hexdigest(),
            "size_bytes": sum(p.stat().st_size for p in out.iterdir())}
