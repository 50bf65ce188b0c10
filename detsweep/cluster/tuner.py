"""The Tune side: connect to Ray, and run one Tune trial per trial config: grid search over the expanded
list, or with `search:` the trials Optuna samples (Ray Tune's OptunaSearch over a define-by-run space).
Each trial is a function trainable that builds and fits a Ray Train `TorchTrainer` (the Train V2 pattern);
`ResultsCallback` (callback.py) writes the rows of history.parquet and results.parquet on the driver."""
from __future__ import annotations

import logging
import os
from typing import Any

import ray
import ray.train
import ray.tune
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.v2._internal.callbacks import DatasetsCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from detsweep.cluster.callback import ResultsCallback, extra_axis_columns
from detsweep.cluster.progress import ProgressCallback
from detsweep.cluster.worker import train_fn_per_worker
from detsweep.results import KEYS_WITH_COLUMNS, infer_extra_columns
from detsweep.storage import TUNE_DIR, join, train_run_name
from detsweep.sweep.cost import Pricing, pricing
from detsweep.sweep.plan import HEAD_RESOURCE, placement_strategy, process_group_backend
from detsweep.sweep.rules import search_objectives
from detsweep.sweep.search import Space, axis_values, parse_space, sampled_trial
from detsweep.sweep.spec import Sweep, TrialConfig


# The workers hold the trial's resources; the trial actor only waits on them. Zero CPU (so two
# 1-CPU workers fit on a 2-core laptop), and 1 MiB of Ray's "memory" resource because Tune
# refuses an all-zero request.
TRIAL_ACTOR_RESOURCES = {"CPU": 0, "memory": 2**20}


def connect(*, quiet: bool) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Join the cluster Ray finds (RAY_ADDRESS, else a running one on this node) or start a local
    one; return its total CPU/GPU and each live node's resources."""
    if quiet:
        # Tune's new console output prints its configuration box and a table whatever `verbose` says; the
        # classic reporter at verbose 0 prints nothing, and ProgressCallback gives the compact view.
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
        # ... and Tune.fit's closing "Wrote the latest version of all result files ..." (INFO) for each run.
        logging.getLogger("ray.tune.tune").setLevel(logging.WARNING)
    # Save Tune's experiment state at every step (not every ~10 s): a driver killed right after a
    # trial ends must find that trial finished when it resumes.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")
    # The dashboard's Train tab shows each trial's run, workers and restarts (a local Ray started
    # here inherits it; cluster.yaml sets it on every node).
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
    if not ray.is_initialized():
        ray.init(log_to_driver=not quiet)
    total = ray.cluster_resources()
    cluster = {k: float(total.get(k, 0.0)) for k in ("CPU", "GPU")}
    if total.get(HEAD_RESOURCE, 0) > 0:  # cluster.yaml's head: it caps the trials at once
        cluster[HEAD_RESOURCE] = float(total[HEAD_RESOURCE])
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    return cluster, nodes


def run_trial(config: dict[str, Any], trials: dict[str, dict[str, Any]], space: Space | None = None) -> None:
    """Tune function trainable: fit one trial's TorchTrainer. Tune's config holds only the trial
    id (a readable progress table and TensorBoard hparams); the full trial configs come through
    the object store (`tune.with_parameters`). A search's config is the sampled point, and the trial
    is built from it with the sweep's `space`, as the driver builds it."""
    from ray.tune.integration.ray_train import TuneReportCallback

    trial = trials[config["trial_id"]] if space is None else sampled_trial(space, config).to_dict()
    res, ft = trial["resources"], trial["fault_tolerance"]
    gpus = res["gpus_per_worker"]
    per_worker = {"CPU": res["cpus_per_worker"], **({"GPU": gpus} if gpus > 0 else {})}
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    trainer = SweepTorchTrainer(
        train_fn_per_worker,
        train_loop_config={"trial": trial},
        torch_config=TorchConfig(backend=process_group_backend(trial)),
        scaling_config=ray.train.ScalingConfig(num_workers=res["ddp_workers"], use_gpu=gpus > 0,
                                               resources_per_worker=per_worker,
                                               placement_strategy=placement_strategy(trial, nodes)),
        run_config=ray.train.RunConfig(
            name=train_run_name(trial["trial_id"]), storage_path=trial["storage"],
            callbacks=[TuneReportCallback()],
            failure_config=ray.train.FailureConfig(max_failures=ft["max_failures"]),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=ft["keep"])),
    )
    trainer.fit()


class SweepTorchTrainer(TorchTrainer):
    """Ray Train's TorchTrainer, less the Ray Data actor it starts for every run. Our workers feed torch
    DataLoaders and pass no `datasets`, yet Train 2.60 starts a DatasetManager actor per run anyway: one more
    Python process importing ray.data in every trial, for nothing. With `datasets` given, nothing changes."""

    def _create_default_callbacks(self) -> list[Any]:
        callbacks = super()._create_default_callbacks()
        return callbacks if self.datasets else [c for c in callbacks if not isinstance(c, DatasetsCallback)]


def trial_actor_resources(cluster: dict[str, float]) -> dict[str, float]:
    """What a trial's Tune actor asks for: almost nothing, plus one unit of the head's `detsweep_trial`
    where the cluster has it (a laptop's local Ray has not: there it would wait forever)."""
    return {**TRIAL_ACTOR_RESOURCES, **({HEAD_RESOURCE: 1} if cluster.get(HEAD_RESOURCE, 0) > 0 else {})}


def _trainable(trials: list[TrialConfig], space: Space | None = None) -> Any:
    by_id = {} if space is not None else {t.trial_id: t.to_dict() for t in trials}
    cluster = ray.cluster_resources() if ray.is_initialized() else {}
    return ray.tune.with_resources(ray.tune.with_parameters(run_trial, trials=by_id, space=space),
                                   trial_actor_resources(cluster))


class SweepSearch(OptunaSearch):
    """OptunaSearch that can also tell Optuna `cost_usd`, which no worker reports: the driver's number
    from the trial's worker_s, its resources and the sweep's prices. Its state, the Optuna study
    included, is pickled with Tune's experiment state, so `Tuner.restore` continues the same study."""

    def __init__(self, *, prices: Pricing | None, **kwargs: Any) -> None:
        self._prices, self._configs = prices, {}
        super().__init__(**kwargs)

    def suggest(self, trial_id: str) -> dict | None:
        config = super().suggest(trial_id)
        if isinstance(config, dict):
            self._configs[trial_id] = config
        return config

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        config = self._configs.get(trial_id)
        if result and "cost_usd" in metrics and self._prices and config and result.get("worker_s") is not None:
            cost = self._prices.trial_usd(sampled_trial(self._space, config).resources, result["worker_s"])
            result = {**result, "cost_usd": cost}
        super().on_trial_complete(trial_id, result, error)


def searcher(sweep: Sweep, space: Space) -> SweepSearch:
    """The search algorithm of a `search:` sweep: Optuna's sampler over the define-by-run `space`, one
    objective or several (Optuna's multi-objective study; Tune's `metric` and `mode` as lists)."""
    import optuna

    s = sweep.search
    assert s is not None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # Tune's progress table says it already
    objectives = search_objectives(s, sweep.source)
    metric, mode = [m for m, _ in objectives], [d for _, d in objectives]
    samplers = {"tpe": lambda: optuna.samplers.TPESampler(seed=s.seed, constant_liar=True),  # liar: parallel trials
                "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=s.seed),
                "random": lambda: optuna.samplers.RandomSampler(seed=s.seed)}
    return SweepSearch(space=space, metric=metric if len(metric) > 1 else metric[0],
                       mode=mode if len(mode) > 1 else mode[0], sampler=samplers[s.sampler](),
                       study_name=sweep.name, prices=pricing(sweep.cost, sweep.source))


class _SampledEpochs(dict):
    """The progress view's trial id -> epochs for a search, whose ids are made as it samples: every trial
    the sweep's `train.epochs`; its length, the '[done/total]', is `num_samples`."""

    def __init__(self, num_samples: int, epochs: int) -> None:
        super().__init__()
        self.num_samples, self.epochs = num_samples, epochs

    def get(self, key: Any, default: Any = None) -> int:
        return self.epochs

    def __len__(self) -> int:
        return self.num_samples


def _trial_name(trial: Any) -> str:
    return trial.config["trial_id"]


def _param_space(trials: list[TrialConfig], space: Space | None) -> dict[str, Any]:
    """Tune's config space: a grid over the trial ids, or nothing for a search (its searcher samples)."""
    return {"trial_id": ray.tune.grid_search([t.trial_id for t in trials])} if space is None else {}


def build_tuner(sweep: Sweep, trials: list[TrialConfig], *, root: str, concurrency: int,
                quiet: bool = False) -> ray.tune.Tuner:
    """A fresh Tuner over `trials`: grid search over the expanded list, one Tune trial each; or, with
    `search:` (`trials` its cells), `num_samples` trials sampled by Optuna."""
    space = parse_space(sweep, check_paths=False) if sweep.search is not None else None
    scheduler = None
    if sweep.scheduler.kind == "asha":
        scheduler = ASHAScheduler(time_attr="epochs_completed", metric=sweep.scheduler.metric,
                                  mode=sweep.scheduler.mode,
                                  max_t=max(t.train.epochs for t in trials),
                                  grace_period=sweep.scheduler.grace_period,
                                  reduction_factor=sweep.scheduler.reduction_factor)
    sampled = {} if space is None else {"search_alg": searcher(sweep, space), "num_samples": sweep.search.num_samples}
    return ray.tune.Tuner(
        _trainable(trials, space),
        param_space=_param_space(trials, space),
        tune_config=ray.tune.TuneConfig(
            max_concurrent_trials=concurrency, scheduler=scheduler, **sampled,
            trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
        run_config=ray.tune.RunConfig(
            name=TUNE_DIR, storage_path=root,
            callbacks=callbacks(sweep, trials, root, quiet=quiet, space=space),
            failure_config=ray.tune.FailureConfig(max_failures=0),  # Train retries; Tune records
            # -q: our one-line-per-event progress instead of Tune's tables and result boxes.
            verbose=0 if quiet else 1),
    )


def callbacks(sweep: Sweep, trials: list[TrialConfig], root: str, *, quiet: bool,
              space: Space | None = None) -> list[Any]:
    """The driver's callbacks: results rows always, the compact progress view with `quiet`."""
    prices = pricing(sweep.cost, sweep.source)
    if space is None:
        by_id, extra = {t.trial_id: t.to_dict() for t in trials}, extra_axis_columns(trials)
        epochs: dict[str, int] = {t.trial_id: t.train.epochs for t in trials}
    else:  # a search: the trials are sampled as it runs
        by_id = {}
        extra = infer_extra_columns({k: v for k, v in axis_values(space).items() if k not in KEYS_WITH_COLUMNS})
        epochs = _SampledEpochs(sweep.search.num_samples, sweep.train.epochs)
    out: list[Any] = [ResultsCallback(root, sweep.name, by_id, extra, space=space, prices=prices)]
    if quiet:
        out.append(ProgressCallback(epochs))
    return out


def restore_tuner(sweep: Sweep, trials: list[TrialConfig], *, root: str) -> ray.tune.Tuner:
    """The interrupted sweep's Tuner: finished trials stay finished, unfinished ones continue
    from their Train checkpoints, errored ones as `fault_tolerance.on_resume_errored` says."""
    mode = sweep.fault_tolerance.on_resume_errored
    space = parse_space(sweep, check_paths=False) if sweep.search is not None else None
    # A search's searcher (its Optuna study) comes back with Tune's experiment state. The grid is given again
    # (Tune does not pickle it): where Tune finds its experiment or searcher state cut short, it logs "Failed
    # to restore the run state", restarts the experiment from this space, and each trial continues from its
    # own Train run's checkpoint (run.py warns first).
    return ray.tune.Tuner.restore(
        join(root, TUNE_DIR), trainable=_trainable(trials, space), param_space=_param_space(trials, space),
        resume_unfinished=True, resume_errored=mode == "resume", restart_errored=mode == "restart")


def fit_sweep(sweep: Sweep, trials: list[TrialConfig], *, root: str, concurrency: int | None, resume: bool,
              quiet: bool) -> None:
    """Run the sweep to its end: a fresh Tuner, or on `resume` the interrupted one restored."""
    if resume:
        tuner = restore_tuner(sweep, trials, root=root)
    else:
        assert concurrency is not None
        tuner = build_tuner(sweep, trials, root=root, concurrency=concurrency, quiet=quiet)
    tuner.fit()
