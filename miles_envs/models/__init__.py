"""Model-side code shared by the embedded engine and the trainer.

- ``factory``: random-init checkpoints of tiny/small Qwen3, Qwen3-MoE and DeepSeek-V3 models.
- ``loading``: load a checkpoint folder (model, tokenizer, MTP draft layers, generation config).
- ``mtp``: multi-token-prediction layers in the DeepSeek-V3 NextN layout and their storage.
- ``routing``: find MoE routers and record the experts they pick (rollout side of R3).

Importing this package has no side effects; each module imports torch/transformers on its own.
"""
