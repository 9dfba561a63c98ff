"""Ready-made tasks a config names by `python:` reference: the verifiable chat task and its exact-answer grader
(`chat`, `python:rlhf.tasks.chat:exact_reward`) and the built-in multi-turn environments (`envs`,
`python:rlhf.tasks.envs:ToolEnv`). The embedded default's task is `rlhf.toy`."""
