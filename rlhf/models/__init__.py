"""Models: where each comes from (`sources`: the embedded default, a registry entry, a folder or a hub name, checked
before any weight loads), loading a policy or scalar-head model with LoRA (`loading`), the final `save_pretrained`
folder (`saving`), tokenizers and their identity (`tokenizer`), `.gguf` files (`gguf`), and the set of models a
stage trains and scores with, PPO's four and DPO's and best-of-N's (`stage_models`)."""
