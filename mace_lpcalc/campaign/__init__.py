"""Validation campaigns: ensembles × precision policies × seeds of MD, scheduled on Dask.

    python -m mace_lpcalc.campaign protocols/campaign_npt_certificate.toml --dry-run
    python -m mace_lpcalc.campaign CAMPAIGN.toml --scheduler cuda
    python -m mace_lpcalc.campaign CAMPAIGN.toml --scheduler slurm   # [cluster] table
    python -m mace_lpcalc.campaign CAMPAIGN.toml --scheduler-address tcp://host:8786

The floors of the campaign, lowest first:

* :mod:`.config`: the campaign file, read and checked before anything runs;
* :mod:`.grid`: the grid expanded into run specs (``OUT/<ensemble>/<protocol>_<policy>_
  seed<k>.h5``) and the specs grouped into tasks;
* :mod:`.task`: :func:`run_task`, what a worker does with one task (resuming each run
  from its checkpoint where it has one);
* :mod:`.clusters`: the Dask cluster (local processes, one worker per GPU, SLURM or PBS
  jobs, or a running scheduler);
* :mod:`.execute`: the tasks submitted with retries, a log line per task, the record
  ``OUT/campaign.json`` and a comparison per ensemble (``OUT/<ensemble>/comparison/``);
* :mod:`.cli`: the command line.
"""

from mace_lpcalc.campaign.config import Campaign, CampaignError, Ensemble, load_campaign
from mace_lpcalc.campaign.grid import RunSpec, Task, expand_grid, group_tasks
from mace_lpcalc.campaign.task import run_task

__all__ = ["Campaign", "CampaignError", "Ensemble", "load_campaign", "RunSpec", "Task",
           "expand_grid", "group_tasks", "run_task"]
