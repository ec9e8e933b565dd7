"""`python -m federate -m hydra/launcher=batched ...`: Hydra hands a launcher all of a sweep's points at
once; this one trains the points that can train in lock step together (federate/sweep.py) and then runs
every job through Hydra's `run_job` as the basic launcher does (job folder, .hydra/, log file,
callbacks), each job handing over its point's prepared result. Points that cannot be grouped run as usual.

    hydra.launcher.group_size=N  at most N points per group (0: no limit), e.g. to bound GPU memory
"""

import copy
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

log = logging.getLogger(__name__)


@dataclass
class BatchedLauncherConf:
    _target_: str = "hydra_plugins.fedclip_launcher.batched_launcher.BatchedLauncher"
    group_size: int = 0


# The schema under its own name, extended by conf/hydra/launcher/batched.yaml's defaults list (a schema
# with the YAML's own name is matched implicitly, which Hydra deprecates with a warning per composition).
ConfigStore.instance().store(group="hydra/launcher", name="batched_schema", node=BatchedLauncherConf, provider="fedclip")


class BatchedLauncher(Launcher):
    def __init__(self, group_size: int = 0) -> None:
        super().__init__()
        self.group_size = int(group_size)
        self.config: Optional[DictConfig] = None
        self.task_function: Optional[TaskFunction] = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def _job_config(self, overrides, idx: int) -> tuple[DictConfig, DictConfig, str]:
        """The job's full config, its task config and its output folder, as run_job will make them."""
        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = idx
            sweep_config.hydra.job.num = idx
        saved = HydraConfig.instance().cfg
        HydraConfig.instance().set_config(sweep_config)
        try:
            output_dir = os.path.join(str(OmegaConf.select(sweep_config, "hydra.sweep.dir")),
                                      str(OmegaConf.select(sweep_config, "hydra.sweep.subdir")))
            task = copy.deepcopy(sweep_config)
            with read_write(task), open_dict(task):
                del task["hydra"]
            OmegaConf.resolve(task)
        finally:
            if saved is not None:
                HydraConfig.instance().set_config(saved)
        return sweep_config, task, os.path.abspath(output_dir)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from federate.sweep import groups, train_group

        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        jobs = [self._job_config(o, initial_job_idx + i) for i, o in enumerate(job_overrides)]
        found = groups([task for _, task, _ in jobs])
        size = self.group_size or len(jobs)
        found = [ids[i:i + size] for ids in found for i in range(0, len(ids), size)]
        grouped = sorted(i for ids in found for i in ids if len(ids) > 1)
        log.info(f"Launching {len(jobs)} jobs: {len(grouped)} in {sum(len(ids) > 1 for ids in found)} "
                 f"group(s) trained together, {len(jobs) - len(grouped)} on their own")
        for ids in found:
            if len(ids) > 1:
                log.info("\tgroup: #" + ", #".join(str(initial_job_idx + i) for i in ids))
                train_group([jobs[i][1] for i in ids], [jobs[i][2] for i in ids])
        runs: List[JobReturn] = []
        for i, (overrides, (sweep_config, _, _)) in enumerate(zip(job_overrides, jobs)):
            log.info(f"\t#{initial_job_idx + i} : {' '.join(filter_overrides(overrides))}")
            runs.append(run_job(hydra_context=self.hydra_context, task_function=self.task_function,
                                config=sweep_config, job_dir_key="hydra.sweep.dir",
                                job_subdir_key="hydra.sweep.subdir"))
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return runs
