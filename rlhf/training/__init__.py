"""What every stage's loop runs on: DeepSpeed ranks and engines (`engine`), resumable checkpoints (`checkpoint`),
the bookkeeping around a loop (`run_keeper` for training stages, `shard_keeper` for stages that write shards), the
stop signal every rank agrees on (`stop_signal`), console and metrics (`tracking`), held-out evaluation
(`evaluation`) and metrics summed over ranks by name (`rank_sums`)."""
