"""The parameters of `tokenize`, `prepare` and `evaluate`, declared once: the CLI's flags and help are generated from them.
Plain Pydantic, no Prefect: `langpwt prepare --help` and argument checks run without loading the orchestrator."""
from __future__ import annotations

import re
from pathlib import Path

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from storage.paths import Home

DEFAULT_VOCAB = 48_951  # the original LangPWT's, <|endoftext|> included


class BadArgument(ValueError):
    """A parameter that cannot be used; the message names it and the reason (exit code 2)."""


class ScaleOut(BaseModel):
    """Where per-file tasks (scan, tokenize-shard) run; default: threads in the flow's process."""
    dask_address: str | None = Field(
        None,
        description="run scans and shards on the Dask cluster of this scheduler, e.g. tcp://10.0.0.5:8786 "
                    "(workers need this checkout and the same $LANGPWT_HOME path, e.g. a network filesystem)")
    dask_local: int | None = Field(None, ge=1, le=256,
                                   description="run them on a Dask LocalCluster of this many worker processes")

    @field_validator("dask_address")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"(tcp|tls|ucx|inproc)://\S+", v):
            raise ValueError(f"{v!r}: expected a Dask scheduler address such as tcp://10.0.0.5:8786")
        return v

    @model_validator(mode="after")
    def _one_cluster(self):
        if self.dask_address and self.dask_local:
            raise ValueError("give dask_address or dask_local, not both")
        return self


class TokenizeParams(ScaleOut):
    """Parameters of `tokenize` (and the tokenize half of `prepare`)."""
    source: str | None = Field(None, description="folder of parquet files laid out like the Hub subset "
                                                 "(default: this home's downloads, else its last run's source)")
    manifest: str | None = Field(None, description="sha256sum output or JSON (a saved Hub listing works) of "
                                                   "--source's files: a file that differs, is missing or is not "
                                                   "listed is recorded failed and never tokenized")
    home: str | None = Field(None, description="state folder; default $LANGPWT_HOME or ./.langpwt")
    workers: int = Field(2, ge=1, le=256, description="source files read and encoded at once (threads of this "
                                                      "process; on Dask, the cluster's workers decide)")
    tokenizer: str | None = Field(None, description="use this tokenizer.json (e.g. GPT-2's) instead of the "
                                                    "home's or a trained one")
    vocab_size: int | None = Field(None, ge=258, le=2**31 - 1,
                                   description=f"vocabulary of a trained tokenizer (default: the home's, or "
                                               f"{DEFAULT_VOCAB:,} for a new home); one that disagrees with the "
                                               f"home's tokenizer is refused unless --retrain-tokenizer")
    tokenizer_sample_mb: int = Field(48, ge=1, description="MB of filtered text a tokenizer is trained on")
    retrain_tokenizer: bool = Field(False, description="train a new tokenizer even if the home has one (the old "
                                                       "one is archived by sha256, its shards turn stale)")
    min_int_score: int | None = Field(3, description="drop documents whose int_score is below this")
    min_language_score: float | None = Field(None, description="drop documents whose language_score is below this")
    min_chars: int | None = Field(None, ge=0, description="drop documents shorter than this many characters")
    max_chars: int | None = Field(None, ge=1, description="drop documents longer than this many characters")
    dumps: list[str] | None = Field(None, description="keep only these crawls (e.g. CC-MAIN-2024-10)")
    dedup: bool = Field(True, description="drop exact duplicates (same id or same text) across all files")
    val_fraction: float = Field(0.005, ge=0.0, lt=1.0,
                                description="share of the first file's documents (by a hash of their id) "
                                            "held out for validation")
    reprocess: list[int] | None = Field(None, description="redo exactly these shards (ids like 3 or shard_000003)")
    force: bool = Field(False, description="redo every shard and re-read every source file for its sha256 "
                                           "(keeps the tokenizer)")
    wait: float = Field(0.0, ge=0, description="seconds to wait for another run on the same home")

    # the step modules are imported where used: they load Polars and NumPy, which a flag check does not need
    def filter_config(self):
        from tasks.filter import FilterConfig

        return FilterConfig(self.min_int_score, self.min_language_score, self.min_chars, self.max_chars,
                            tuple(self.dumps) if self.dumps else None, self.dedup, self.val_fraction)

    def tokenizer_config(self, home_vocab: int | None = None):
        """The config a trained tokenizer gets: the vocabulary given, else the home's, else the default."""
        from tasks.tokenizer import TokenizerConfig

        vocab = self.vocab_size or home_vocab or DEFAULT_VOCAB
        return TokenizerConfig(vocab_size=vocab, sample_bytes=self.tokenizer_sample_mb * 2**20)


_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_bytes(text) -> int:
    """A byte count: an int, or text such as 0, 500M or 20G (powers of 1000)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", str(text).upper())
    if not m:
        raise ValueError(f"{text!r}: expected bytes such as 0, 500M or 20G")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


class HubSubset(BaseModel):
    """Which Hub files to fetch and how carefully: shared by `download` and `prepare`, declared here once."""
    dataset: str = Field("HuggingFaceFW/fineweb-edu", description="Hub dataset repo")
    subset: str = Field("sample-10BT", description="sample-10BT, sample-100BT, sample-350BT or a crawl like "
                                                   "CC-MAIN-2024-10")
    revision: str = Field("main", description="branch, tag or commit; resolved to one commit for every file")
    include: str | None = Field(None, description="only repo paths matching this glob, within the subset")
    max_files: int | None = Field(None, ge=1, description="only the first N files of the subset")
    min_free_bytes: int = Field("1G", ge=0, validate_default=True,
                                description="disk space to leave free after the download, in bytes (500M, 20G)")
    retries: int = Field(8, ge=0, description="attempts per file without progress, on 429/5xx/timeouts")

    @field_validator("min_free_bytes", mode="before")
    @classmethod
    def _bytes(cls, v):
        return parse_bytes(v)

    @field_validator("subset")
    @classmethod
    def _known_subset(cls, v: str) -> str:
        from storage.hub import subset_pattern  # the Hub client's module: loaded only when a subset is given

        subset_pattern(v)
        return v


class PrepareParams(TokenizeParams, HubSubset):
    """`tokenize`'s parameters; without `source`, those of the Hub download too."""
    download_workers: int = Field(4, ge=1, le=64, description="files downloaded concurrently")

    def download_params(self):
        """The download half as tasks.download's DownloadParams (imported here: it loads the Hub client)."""
        from tasks.download import DownloadParams

        return DownloadParams(**self.model_dump(include=set(HubSubset.model_fields)), workers=self.download_workers,
                              progress=False)


def check_paths(params: TokenizeParams) -> None:
    """The given files and folders exist, checked before a home, catalog or row is made (BadArgument)."""
    if params.source is not None and not Path(params.source).expanduser().is_dir():
        raise BadArgument(f"--source {params.source}: not a directory")
    if params.manifest is not None and not Path(params.manifest).expanduser().is_file():
        raise BadArgument(f"--manifest {params.manifest}: not a file")
    if params.tokenizer is not None and not Path(params.tokenizer).expanduser().is_file():
        raise BadArgument(f"--tokenizer {params.tokenizer}: not a file")


def check_home(params: TokenizeParams, home: Home) -> None:
    """`check_paths`, and an explicit --vocab-size against the home's tokenizer: a disagreement is refused
    (BadArgument) before anything is written, unless the tokenizer is given or retrained."""
    check_paths(params)
    if params.vocab_size is None or params.retrain_tokenizer or params.tokenizer:
        return
    from tasks.tokenizer import tokenizer_vocab

    have = tokenizer_vocab(home.tokenizer)
    if have is not None and have != params.vocab_size:
        raise BadArgument(f"--vocab-size {params.vocab_size:,}: this home's tokenizer has {have:,} "
                          f"({home.tokenizer}); leave the flag out to reuse it, or add --retrain-tokenizer "
                          f"(its shards are then rebuilt)")


TASKS = ("bpb", "hellaswag")


class EvaluateParams(BaseModel):
    """Parameters of `langpwt evaluate` and of the flow."""
    model_config = ConfigDict(extra="forbid")
    checkpoint: str = Field("latest", description="latest | run id | run folder | step folder")
    home: str | None = Field(None, description="state folder; default $LANGPWT_HOME or ./.langpwt")
    tasks: list[str] = Field(default_factory=lambda: list(TASKS),
                             description="evaluations to run, comma-separated (default: bpb,hellaswag)")
    hellaswag_data: str | None = Field(None, description="HellaSwag validation file, .jsonl in the original schema or "
                                                         ".parquet in the Hub's (default: Rowan/hellaswag, fetched "
                                                         "once into HOME/eval/hellaswag)")
    limit: int | None = Field(None, ge=1, description="score only the first N HellaSwag items (default: all 10,042)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when visible, else CPU")
    batch_size: int = Field(16, ge=1, description="val windows per forward; HellaSwag takes a quarter as many "
                                                  "items (4 endings each)")

    @field_validator("tasks", mode="before")
    @classmethod
    def _split(cls, v):
        names = [t.strip() for x in ([v] if isinstance(v, str) else v) for t in str(x).split(",") if t.strip()]
        unknown = [t for t in names if t not in TASKS]
        if unknown or not names:
            raise ValueError(f"unknown task {unknown[0]!r}" if unknown else "no task given")
        return list(dict.fromkeys(names))

    def home_dir(self) -> Home:
        return Home.from_env(self.home)
