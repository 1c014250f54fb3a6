"""rsd.analysis: analysing evaluation and benchmark results (nothing here runs an episode).

- ``stats``: Wilson intervals, paired tables and exact McNemar tests on paired episodes.
- ``sequential``: the anytime-valid sequential paired comparison (mixture SPRT on the discordant pairs).
- ``compare``: evaluation folders, training runs and W&B runs as tables; ``plots``: their figures;
  ``notebook``: run ``notebooks/compare_runs.ipynb`` headless.
- ``report``: the original guide's comparison table (``python -m rsd.analysis.report``);
  ``frontier``: operating points, speed (one benchmark run) against closed-loop success.
- ``verify``: recompute every committed result from its per-episode records
  (``python -m rsd.analysis.verify docs/results``).

The running half (episodes, resume, shards, merge, summaries) is :mod:`rsd.eval`. Submodules are not
imported here, so ``rsd.eval.summary`` can import ``rsd.analysis.stats`` without a cycle.
"""
