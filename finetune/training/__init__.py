"""Training: the recipe (trainer: plan_run -> build_run -> run_loop -> finish_run) and what it is made of:
the run's records (run_state) and data (run_data), its length and learning rate (schedule), the loss
(losses), evaluation during the run (train_eval) and against the base afterwards (evaluation, metrics),
checkpoints, SIGTERM (stopping), distributed set-up, log lines (progress), the training card (card),
jemalloc (allocator) and the command line (cli)."""
