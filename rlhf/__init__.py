"""rlhf: InstructGPT-style RLHF (SFT -> reward model -> PPO) on DeepSpeed."""

__version__ = "0.1.0"
