"""`explain_memory_limit(message)`: an error that means "out of memory" said in words that do.

Under a memory limit (ulimit -v, the job's --mem, a cgroup) a library that is loaded late (PyAV's
FFmpeg in the first decode, an optional package) fails with the dynamic loader's words,
"libavcodec.so: failed to map segment from shared object", which do not mention memory: in an
evaluation every video then "could not be decoded", and the run ends blaming the data.
"""

from __future__ import annotations

__all__ = ["explain_memory_limit"]

# The dynamic loader's message when mmap of a shared library fails (ENOMEM).
_NO_MEMORY_TO_LOAD = "failed to map segment"


def explain_memory_limit(message: str) -> str:
    """`message`, and what to do when it says a library could not be loaded for lack of memory."""
    if _NO_MEMORY_TO_LOAD not in message:
        return message
    return (
        f"{message} (out of memory: the process's memory limit (ulimit -v, the job's --mem or a cgroup) "
        "left no room to load this library; raise the limit, or use fewer DataLoader workers "
        "(num_workers, trainer.num_workers) or a smaller batch)"
    )
