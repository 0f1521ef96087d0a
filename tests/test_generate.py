"""Generation from a trained checkpoint: streamed, seeded, tokenizer checked.
The checkpoint comes from a short real training run, not saved random weights."""
from __future__ import annotations

import io
import json

import pytest

from flows.cli.train import generate
from tests.train_fixtures import FAST, run_trainer, train_home  # noqa: F401


class Chunks(io.StringIO):
    def __init__(self):
        super().__init__()
        self.writes = 0

    def write(self, s):
        self.writes += bool(s)
        return super().write(s)


def test_generate_streams_from_latest_checkpoint(train_home):
    assert run_trainer(train_home, *FAST, "--max-steps", "20", "--run-id", "g")[0] == 0
    out = Chunks()
    text = generate(train_home, "latest", "The function", max_new_tokens=30, seed=5, out=out)
    assert text.startswith("The function") and len(text) > len("The function") + 10
    assert out.writes > 10 and out.getvalue().rstrip("\n") == text  # piece by piece, as sampled
    assert generate(train_home, "g", "The function", max_new_tokens=30, seed=5, out=io.StringIO()) == text
    assert generate(train_home, "latest", "The function", max_new_tokens=30, seed=6, out=io.StringIO()) != text
    tok = json.loads(train_home.tokenizer.read_text())
    train_home.tokenizer.write_text(json.dumps(tok, indent=2))
    with pytest.raises(ValueError, match="differs from the tokenizer checkpoint"):
        generate(train_home, "latest", "x", max_new_tokens=2, out=io.StringIO())
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        generate(train_home, "nope", "x", out=io.StringIO())
