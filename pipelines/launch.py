"""Running a training stage as an external process through Dagster Pipes.

The tiny profile runs `python -m unirl.cli <stage>` on the Dagster host; on a cluster the same entry point is launched
with `torchrun`/`deepspeed` by setting the `launcher` prefix (e.g. `["torchrun", "--nproc_per_node=8"]` or
`["deepspeed", "--num_gpus=8"]`), so the asset and `dvc repro` always run the same code with the same params.yaml.
The stage writes its results under `data/`; the asset reads them back for its metadata.
"""


import os
import sys

import dagster as dg


class StageLauncher(dg.ConfigurableResource):
    """How training stages are launched: `launcher` is the command prefix before `-m unirl.cli` (empty = python)."""

    launcher: list[str] = []
    extra_env: dict[str, str] = {}

    def command(self, stage: str, params_path: str, args: list[str] | None = None) -> list[str]:
        prefix = list(self.launcher) if self.launcher else [sys.executable]
        return [*prefix, "-m", "unirl.cli", "--params", params_path, stage, *(args or [])]

    def run(self, context: dg.AssetExecutionContext, stage: str, params_path: str, args: list[str] | None = None):
        cmd = self.command(stage, params_path, args)
        context.log.info("launching: %s", " ".join(cmd))
        from unirl.train.distributed import child_env  # torch: imported when a stage launches, not at load

        env = {**child_env(), **self.extra_env, "UNIRL_PARAMS": params_path}
        return dg.PipesSubprocessClient(env=env, cwd=os.getcwd()).run(context=context, command=cmd)
