"""The LangPWT GPT in plain PyTorch: model, fused output layers, data loader, training loop, generation.
Imports only torch, numpy and storage/ (no Prefect or DuckDB), so it runs on a bare GPU machine; importing it
changes nothing in the interpreter (start-up caches are the harness's business: benchmarks/gpu_session.sh)."""
