"""rsd.eval: LIBERO evaluation under the OpenVLA / OpenVLA-OFT protocol.

The policies it drives live in :mod:`rsd.policies` (interface, harness policies, engine policy, registry).
- ``rollout``: one episode (init state, warm-up, open-loop chunks, binarized gripper, success = ``done``).
- ``runner``: one evaluation (resume, run identity, held-out verdict, early stop), built from ``work_list`` (the
  episodes asked for, in order), ``start_states`` (generated scenes, the held-out check), ``workers`` (spawned
  processes, the pool, error capture) and ``episode_log`` (the resumable JSONL log).
- ``summary``: aggregation, the original guide's summary, per-task tables, files and W&B.
- Statistics, reports, comparisons across runs, operating points and the verifier: :mod:`rsd.analysis`.

Entry point: ``python evaluate.py ckpt=best trials=50`` (``conf/eval.yaml``). Nothing here imports torch
at module level, so worker processes start fast and set their thread counts first.
"""

from rsd.eval.rollout import EpisodeResult, run_episode
from rsd.eval.runner import EvalRun, load_records, run_evaluation
from rsd.eval.summary import format_guide_summary, summarize, write_summary
from rsd.eval.wandb_log import log_to_wandb

__all__ = [
    "EpisodeResult",
    "EvalRun",
    "format_guide_summary",
    "load_records",
    "log_to_wandb",
    "run_episode",
    "run_evaluation",
    "summarize",
    "write_summary",
]
