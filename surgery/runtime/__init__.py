"""Process-level runtime: torch.distributed ranks (launched by torchrun, gloo on CPU, NCCL on GPU)."""
from surgery.runtime.distributed import Ranks, agree, init_ranks, launch_command, rank_log_prefix

__all__ = ["Ranks", "agree", "init_ranks", "launch_command", "rank_log_prefix"]
