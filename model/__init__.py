"""The LangPWT GPT in plain PyTorch: model, fused output layers, data loader, training loop, generation.
Imports only torch, numpy and storage/ so it runs on a bare GPU machine; importing it changes nothing else."""
