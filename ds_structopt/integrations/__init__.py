"""Framework integrations (DeepSpeed; plain PyTorch DDP/FSDP2). They import the math, never the reverse."""
