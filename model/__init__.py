"""The LangPWT GPT in plain PyTorch: model, fused output layer, data loader, training loop, generation.
Imports only torch, numpy and storage/ (no Prefect or DuckDB) so it runs on a bare GPU machine."""
