"""unirl: UniRL-Zero (RL on a unified LM + diffusion model) as a pipeline-orchestrated project.

The library never imports Dagster or DVC; ``pipelines/`` and ``dvc.yaml`` call into it.
"""

__version__ = "0.1.0"
