"""Stage 2 library: config, data, prompts, labels, packing, loss, trainer, checkpoints.

Importing this package pulls in no DeepSpeed, Ray or vLLM; modules that need them import them.
"""
