"""Where a campaign's tasks run: a Dask cluster started for it, or a scheduler already
running.

* ``local``: ``distributed.LocalCluster`` of ``workers`` processes with one thread each
  (Dask's nanny also sets ``OMP_NUM_THREADS=1`` in them, so each run is single-threaded
  on a CPU; on one GPU the workers share it, as parallel runs do);
* ``cuda``: ``dask_cuda.LocalCUDACluster``, one worker per visible GPU, each seeing only
  its own (``device = "cuda"`` in the campaign then means that worker's GPU);
* ``slurm`` / ``pbs``: ``dask_jobqueue.SLURMCluster`` / ``PBSCluster`` built from the
  campaign's ``[cluster]`` table (its keys are the cluster class's arguments: ``queue``,
  ``account``, ``walltime``, ``cores``, ``memory``, ``processes``, ``job_cpu``,
  ``job_extra_directives``, ...; plus ``jobs``, how many batch jobs to submit). Each
  worker runs ``cores / processes`` tasks at once, so keep ``cores = processes`` (one
  task per worker) and book further CPUs with ``job_cpu``;
* an address (``tcp://host:8786``): join that scheduler and its workers.

The clusters started here are told (``distributed.scheduler.allowed-failures``) to run
a task again after as many worker deaths as the campaign allows retries, as
``retries`` on a future only covers a task that raised.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import sys

import dask
import distributed

from mace_lpcalc.campaign.config import CampaignError

SCHEDULERS = ("local", "cuda", "slurm", "pbs")
_JOBQUEUE_CLASSES = {"slurm": "SLURMCluster", "pbs": "PBSCluster"}
_EXTRAS = {"cuda": ("dask_cuda", "cuda-cluster"), "slurm": ("dask_jobqueue", "cluster"),
           "pbs": ("dask_jobqueue", "cluster")}


@dataclasses.dataclass
class Connection:
    """A client connected to the scheduler, and the cluster when it was started here."""

    client: distributed.Client
    cluster: object | None
    #: What campaign.json records: the scheduler kind, its address and dashboard.
    description: dict

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def connect(scheduler: str, *, address: str | None = None, workers: int | None = None,
            cluster_options: dict | None = None, allowed_failures: int = 3,
            dashboard_address: str = ":8787") -> Connection:
    """Start the cluster ``scheduler`` names (or join ``address``) and connect to it."""
    if address is not None:
        client = distributed.Client(address)
        cluster = None
    else:
        with dask.config.set({"distributed.scheduler.allowed-failures": allowed_failures}):
            cluster = start_cluster(scheduler, workers=workers,
                                    cluster_options=cluster_options or {},
                                    dashboard_address=dashboard_address)
        client = distributed.Client(cluster)
    description = {"scheduler": "address" if address else scheduler,
                   "address": client.scheduler.address,
                   "dashboard": client.dashboard_link, "versions": dask_versions()}
    return Connection(client=client, cluster=cluster, description=description)


def start_cluster(scheduler: str, *, workers: int | None, cluster_options: dict,
                  dashboard_address: str):
    """A new cluster of the kind ``scheduler`` names; batch jobs are submitted here."""
    if scheduler == "local":
        return distributed.LocalCluster(n_workers=workers or default_local_workers(),
                                        threads_per_worker=1, processes=True,
                                        dashboard_address=dashboard_address)
    if scheduler == "cuda":
        dask_cuda = _optional_module("cuda")
        return dask_cuda.LocalCUDACluster(threads_per_worker=1,
                                          dashboard_address=dashboard_address,
                                          **({"n_workers": workers} if workers else {}))
    if scheduler in _JOBQUEUE_CLASSES:
        options = dict(cluster_options)
        jobs = options.pop("jobs", 1)
        if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
            raise CampaignError(f"[cluster] jobs must be a positive integer, got {jobs!r}")
        cluster = jobqueue_cluster(scheduler, options, dashboard_address)
        cluster.scale(jobs=jobs)
        return cluster
    raise CampaignError(f"unknown scheduler {scheduler!r}; known: {', '.join(SCHEDULERS)} "
                        "or an address")


def jobqueue_cluster(scheduler: str, options: dict, dashboard_address: str = ":8787"):
    """The dask-jobqueue cluster of ``[cluster]`` ``options`` (``jobs`` left out),
    nothing submitted yet (``cluster.job_script()`` shows what would be)."""
    dask_jobqueue = _optional_module(scheduler)
    cluster_class = getattr(dask_jobqueue, _JOBQUEUE_CLASSES[scheduler])
    options = dict(options)
    scheduler_options = {"dashboard_address": dashboard_address,
                         **options.pop("scheduler_options", {})}
    try:
        return cluster_class(scheduler_options=scheduler_options, **options)
    except (TypeError, ValueError) as err:
        raise CampaignError(f"[cluster] table for {cluster_class.__name__}: {err}") from None


def default_local_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
               else os.cpu_count() or 1)


def dask_versions() -> dict[str, str]:
    """Versions of dask, distributed and the cluster packages this process loaded."""
    versions = {"dask": dask.__version__, "distributed": distributed.__version__}
    for module in ("dask_jobqueue", "dask_cuda"):
        if module in sys.modules:
            versions[module] = getattr(sys.modules[module], "__version__", "unknown")
    return versions


def dashboard_note() -> str:
    """Why the dashboard link may show nothing: the page needs bokeh."""
    if importlib.util.find_spec("bokeh") is None:
        return " (install bokeh to serve the dashboard)"
    return ""


def _optional_module(scheduler: str):
    module, extra = _EXTRAS[scheduler]
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise CampaignError(f"--scheduler {scheduler} needs {module.replace('_', '-')}, "
                            f"which is not installed ({err}); install it with pip install "
                            f"'mace_lpcalc[{extra}]'") from None
