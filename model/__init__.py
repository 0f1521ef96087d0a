"""The LangPWT GPT in plain PyTorch: model, fused output layer, data loader, training loop, generation.
Imports only torch, numpy and storage/ (no Prefect or DuckDB) so it runs on a bare GPU machine."""
from model.bytecode import cache_bytecode as _cache_bytecode

# before anything imports torch: on an install that ships no bytecode, its ~1,900 modules recompile at every start
_cache_bytecode()
