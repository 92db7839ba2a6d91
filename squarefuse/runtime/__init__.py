"""Process-level infrastructure that knows nothing of models or data; every other package may use it.

launch_env    `DistInfo`: this process's rank and world size from the launcher's environment (no torch)
distributed   the process group (torchrun, SLURM) and the few collectives we need
precision     the `precision` names (bf16, fp16, fp32, auto) and their autocast context
workers       DataLoader worker counts, CPU threads, stop signals and shutdown of workers
atomic_file   `atomic_write`: a crash mid-write leaves the old file, never half a file
process_pool  the data scripts' process pool; `die_with_parent`: helper processes end with their parent
safe_text     user text (class names, paths) made safe for CSV files, log lines and plots
memory_limit  `explain_memory_limit`: "failed to map segment" (a library that did not fit) said as out of memory
"""
