"""What the five stage scripts need but a reader did not come for, one module per job; each
module's docstring says which stages use it. flags (command lines), rundir (the run
directory, metrics, the lock), data (reading files, the data stream, the rollout record
check), distributed (processes, FSDP2, the optimizer), model (the chat format, the tiny
model, checkpoints), policy (policy steps and their commit), row_cache (the sampler's KV
cache), rollout_files and dipo_metrics (those stages' files and log lines), engine
(LMDeploy), sandbox (the grader's forked child) and exact (the exact estimator). The
learning curves are analysis, in benchmarks/curves.py."""
