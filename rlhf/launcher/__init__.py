"""Before any rank starts and to start them: each stage's input checks (`preflight`), `rlhf plan`'s per-rank memory
estimate and the warning before a launch (`memory_plan`, `memory_estimates`, `memory_shapes`, `memory_check`), and
the command that starts a stage program on N ranks under deepspeed, torchrun, plain python or srun (`command`, with
a free rendezvous port from `ports`)."""
