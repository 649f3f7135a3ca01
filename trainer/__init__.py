"""Training core: config tree, process-group bootstrap, Llama model, DeepSpeed engine, fit loop, checkpoints."""
