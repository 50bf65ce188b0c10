"""The search space: each bad entry one `error:` line before Ray (a table), the conditional define-by-run
space run by Optuna itself (pruned like the grid, stable ids), the cells, the --dry-run text and the
--resume check of search.json."""
from __future__ import annotations

import pytest

from detsweep.sweep import SweepError, parse_sweep
from detsweep.sweep.search import cells, describe, parse_space, sampled_trial
from detsweep.sweep.study import check_search_resume, save_search

SPACE = {"regime": {"choice": ["full", "lora_only", "partial"]}, "lora.rank": {"choice": [2, 4, 8, 16, 32]},
         "lora.alpha": {"choice": [8, 16, 32]}, "train.lr": {"loguniform": [1.0e-5, 3.0e-4]}}


def sweep_with(space=None, **sections):
    raw = {"name": "s", "model": {"detr": {"backbone": "resnet18"}},
           "search": {"num_samples": 24, "objectives": ["ap:max", "trainable_params:min"],
                      "space": SPACE if space is None else space}, **sections}
    return parse_sweep(raw, "f.yaml", check_paths=False)


def space_of(space=None, **sections):
    return parse_space(sweep_with(space, **sections), check_paths=False)


BAD_SPACES = [
    ({"lora.rnk": {"choice": [4]}}, "f.yaml: search.space.lora.rnk: unknown key 'lora.rnk'; allowed keys are "
                                    "['rank', 'alpha', 'dropout', 'placement'"),
    ({"train.lr_typo": {"loguniform": [1e-5, 1e-4]}}, "f.yaml: search.space.train.lr_typo: unknown key "
                                                      "'train.lr_typo'; allowed keys are ['epochs'"),
    ({"data.image_size": {"choice": [64, 128]}}, "f.yaml: search.space.data.image_size: not a key a search samples"),
    ({"model.detr.weights": {"choice": ["none", "coco"]}}, "f.yaml: search.space.model.detr.weights: not a key"),
    ({"train.seed": {"choice": [0, 1]}}, "f.yaml: search.space.train.seed: not a key a search samples"),
    ({"train.lr": {"logunif": [1e-5, 1e-4]}}, "f.yaml: search.space.train.lr: {'logunif': [1e-05, 0.0001]} is not "
                                              "a distribution; use one of ['{choice: [...]}', '{uniform: [...]}', "
                                              "'{loguniform: [...]}', '{int: [...]}']"),
    ({"train.lr": {"uniform": [1e-5, 1e-4], "choice": [1e-4]}}, "f.yaml: search.space.train.lr: "),
    ({"train.lr": [1e-5, 1e-4]}, "f.yaml: search.space.train.lr: [1e-05, 0.0001] is not a distribution"),
    ({"train.lr": {"loguniform": [3e-4, 1e-5]}},
     "f.yaml: search.space.train.lr.loguniform: low 0.0003 must be < high 1e-05"),
    ({"train.lr": {"uniform": [1e-4, 1e-4]}}, "f.yaml: search.space.train.lr.uniform: low 0.0001 must be < high"),
    ({"train.lr": {"loguniform": [0, 1e-4]}}, "f.yaml: search.space.train.lr.loguniform: low 0 must be > 0 for a log "
                                              "scale"),
    ({"train.lr": {"uniform": [1e-4]}}, "f.yaml: search.space.train.lr.uniform: [0.0001] must be [low, high], two "
                                        "finite numbers"),
    ({"train.lr": {"uniform": ["a", "b"]}}, "f.yaml: search.space.train.lr.uniform: ['a', 'b'] must be [low, high]"),
    ({"train.lr": {"choice": []}}, "f.yaml: search.space.train.lr.choice: [] must be a non-empty list"),
    ({"lora.rank": {"uniform": [2, 32]}}, "f.yaml: search.space.lora.rank.uniform: uniform samples real numbers, but "
                                          "lora.rank is of type <class 'int'>; use {int: [low, high]}"),
    ({"lora.placement": {"uniform": [0, 1]}}, "f.yaml: search.space.lora.placement.uniform: uniform samples real "
                                              "numbers, but lora.placement is of type"),
    ({"train.lr": {"int": [1, 2]}}, "f.yaml: search.space.train.lr.int: {int: [low, high]} needs whole numbers on a "
                                    "whole-number key"),
    ({"train.epochs": {"int": [1, 2.5]}}, "f.yaml: search.space.train.epochs.int: {int: [low, high]} needs whole "
                                          "numbers"),
    ({"lora.rank": {"choice": [0, 4]}, "regime": {"choice": ["lora_only"]}},
     "f.yaml: search.space.lora.rank: 0 must be > 0"),
    ({"lora.placement": {"choice": ["attn"]}, "regime": {"choice": ["lora_only"]}},
     "f.yaml: search.space.lora.placement: 'attn' is not one of ['attention_only', 'attention_ffn'"),
    ({"lora.rank": {"choice": [4, "8"]}, "regime": {"choice": ["lora_only"]}},
     "f.yaml: search.space.lora.rank: '8' must be of type int"),
    ({"lora.dropout": {"uniform": [0.0, 1.0]}, "regime": {"choice": ["lora_only"]}},
     "f.yaml: search.space.lora.dropout: 1.0 must be in [0, 1)"),
    ({"regime": {"choice": ["full", "lora"]}}, "f.yaml: search.space.regime.choice: 'lora' is not one of ['full', "
                                               "'lora_only', 'partial', 'two_stage']"),
    ({"model": {"choice": ["detr_r51"]}}, "f.yaml: search.space.model.choice: 'detr_r51' is not one of ["),
    ({"regime": {"uniform": [0, 1]}}, "f.yaml: search.space.regime.uniform: regime takes only {choice: [...]}"),
    ({"train.lr": {"choice": [[1e-4]]}}, "f.yaml: search.space.train.lr.choice: [0.0001] must be a number, a string, "
                                         "a bool or null"),
    ({"train.lr": {"choice": [1e-4, 1e-4]}}, "f.yaml: search.space.train.lr.choice: [0.0001, 0.0001] has repeated "
                                             "values"),
    ({"lora.rank": {"choice": [4, 8]}}, "f.yaml: search.space.lora.rank: never sampled: it applies to no model and "
                                        "regime the search picks ([('detr', 'full')]); LoRA keys need lora_only"),
    ({"model.faster_rcnn.min_size": {"int": [400, 800]}}, "f.yaml: search.space.model.faster_rcnn.min_size: never "
                                                          "sampled"),
    ({"model": {"choice": ["fasterrcnn_r50_fpn"]}, "regime": {"choice": ["lora_only"]}},
     "f.yaml: search.space.model: 'fasterrcnn_r50_fpn' runs none of the regimes the search picks (['lora_only']); "
     "model.faster_rcnn.regimes is ['full']"),
    ({"train.epochs": {"int": [1, 4]}}, "f.yaml: search.space.train.epochs: 1 must be >= train.lr_drop_epoch (3)"),
    ({}, "f.yaml: search.space: must map at least one key to a distribution"),
]


@pytest.mark.parametrize("space, message", BAD_SPACES, ids=[m.split(": ")[1] + f"-{i}"
                                                            for i, (_, m) in enumerate(BAD_SPACES)])
def test_each_bad_space_entry_is_one_line(space, message):
    sections = {"train": {"lr_drop_epoch": 3, "epochs": 4}} if "train.epochs" in space else {}
    with pytest.raises(SweepError) as e:
        space_of(space, **sections)
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


BAD_SECTIONS = [
    ({"scheduler": "asha"}, "f.yaml: scheduler: 'asha' cannot stop trials of a multi-objective search (2 objectives): "
                            "Optuna cannot prune multi-objective studies, and ASHA would judge trials by "
                            "scheduler.metric alone; use scheduler: none, or one objective"),
    ({"search": {"objectives": ["ap:maximum"]}}, "f.yaml: search.objectives[0]: 'ap:maximum' is not METRIC:max or "
                                                 "METRIC:min"),
    ({"search": {"objectives": ["apx:max"]}}, "f.yaml: search.objectives[0]: 'apx' is not a reported metric; use one of"
                                              " ['ap', "),
    ({"search": {"objectives": ["ap:max", "ap:min"]}}, "f.yaml: search.objectives[1]: 'ap' is given twice"),
    ({"search": {"objectives": []}}, "f.yaml: search.objectives: [] must name at least one objective"),
    ({"search": {"objectives": ["cost_usd:min"]}}, "f.yaml: search.objectives: cost_usd needs prices"),
    ({"search": {"num_samples": 0}}, "f.yaml: search.num_samples: 0 must be >= 1"),
    ({"search": {"kind": "hyperopt"}}, "f.yaml: search.kind: 'hyperopt' is not one of ['optuna']"),
    ({"search": {"sampler": "cmaes"}}, "f.yaml: search.sampler: 'cmaes' is not one of ['tpe', 'nsga2', 'random']"),
    ({"search": {"spaces": {}}}, "f.yaml: search.spaces: unknown key; allowed keys are ['kind', 'num_samples', "),
    ({"grid": {"train.seed": [0, 1]}}, "f.yaml: grid.train.seed: 2 values with search: the grid fixes a search's keys "
                                       "(one value each); to search over them, use search.space.train.seed: "
                                       "{choice: [...]}"),
    ({"grid": {"train.lr": [1e-4]}}, "f.yaml: search.space.train.lr: also fixed by grid.train.lr; keep one of them"),
]


@pytest.mark.parametrize("sections, message", BAD_SECTIONS, ids=[m.split(": ")[1] for _, m in BAD_SECTIONS])
def test_bad_search_sections(sections, message):
    raw = {"name": "s", "search": {"objectives": ["ap:max", "trainable_params:min"], "space": SPACE}}
    for key, value in sections.items():
        raw[key] = {**raw[key], **value} if key == "search" else value
    with pytest.raises(SweepError) as e:
        parse_space(parse_sweep(raw, "f.yaml", check_paths=False), check_paths=False)
    assert str(e.value).startswith(message), str(e.value)


def test_asha_with_one_objective_is_fine():
    space_of(scheduler="asha", search={"objectives": ["ap:max"], "space": SPACE})


class Fixed:
    """Optuna's define-by-run calls, answered from a table (optuna.trial.FixedTrial without Optuna)."""

    def __init__(self, params, number=7):
        self.params, self.number, self.asked = params, number, []

    def _get(self, name):
        self.asked.append(name)
        return self.params[name]

    def suggest_categorical(self, name, choices):
        assert self.params[name] in choices
        return self._get(name)

    def suggest_float(self, name, low, high, log=False):
        assert low <= self.params[name] <= high
        return self._get(name)

    def suggest_int(self, name, low, high):
        return self._get(name)


def test_a_sampled_trial_and_its_readable_id():
    space = space_of()
    trial = Fixed({"regime": "lora_only", "lora.rank": 8, "lora.alpha": 16, "train.lr": 3.2e-5})
    config = {**trial.params, **space(trial)}
    assert config["trial_id"] == "s007-detr_r18-lora_only-r8-a16-lr3.2e-05" and config["sample"] == 7
    t = sampled_trial(space, config)
    assert (t.trial_id, t.regime, t.lora.rank, t.lora.alpha, t.train.lr) == (config["trial_id"], "lora_only", 8, 16,
                                                                             3.2e-5)
    assert t.axes == {"lora.rank": 8, "lora.alpha": 16, "train.lr": 3.2e-5}


def test_no_lora_key_is_sampled_outside_lora_only():
    space = space_of()
    trial = Fixed({"regime": "full", "train.lr": 1e-4}, number=3)
    config = {**trial.params, **space(trial)}
    assert trial.asked == ["regime", "train.lr"]  # Optuna is never asked for a rank
    assert config["trial_id"] == "s003-detr_r18-full-lr0.0001"
    t = sampled_trial(space, config)
    assert t.lora is None and t.axes == {"train.lr": 1e-4}


def test_with_optuna_pruned_stable_and_complete():
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = space_of({**SPACE, "model": {"choice": ["detr_r50", "fasterrcnn_r50_fpn"]},
                      "model.detr.num_queries": {"int": [10, 100]}})
    assert space.regime_param("detr") == "regime@detr" and space.regimes["faster_rcnn"] == ("full",)

    def ids(seed):
        study = optuna.create_study(directions=["maximize", "minimize"],
                                    sampler=optuna.samplers.RandomSampler(seed=seed))
        out = []
        for i in range(40):
            trial = study.ask()
            config = {**space(trial), **trial.params}
            t = sampled_trial(space, config)
            lora_keys = {k for k in trial.params if k.startswith("lora.")}
            assert bool(lora_keys) == (t.regime == "lora_only"), trial.params
            assert ("model.detr.num_queries" in trial.params) == (t.family == "detr")
            assert t.regime in ("full",) or t.family == "detr"  # Faster R-CNN only fully fine-tuned
            assert 1e-5 <= t.train.lr <= 3e-4 and t.trial_id.startswith(f"s{i:03d}-")
            study.tell(trial, [0.1, 1.0])
            out.append(t.trial_id)
        return out

    first = ids(0)
    assert first == ids(0) and len(set(first)) == 40
    assert {i.split("-")[1] for i in first} == {"detr_r18", "fasterrcnn_r50_fpn"}


def test_cells_hold_each_regimes_resources():
    space = space_of(resources_by_regime={"lora_only": {"ddp_workers": 1, "gpus_per_worker": 0.5}},
                     resources={"ddp_workers": 2, "cpus_per_worker": 4, "gpus_per_worker": 1})
    got = {c.trial_id: (c.resources.ddp_workers, c.resources.gpus_per_worker) for c in cells(space)}
    assert got == {"detr_r18-full": (2, 1.0), "detr_r18-lora_only": (1, 0.5), "detr_r18-partial": (2, 1.0)}


def test_the_grid_fixes_keys_and_the_search_samples_within():
    space = space_of({"train.lr": {"loguniform": [1e-5, 1e-3]}},
                     grid={"model": ["fasterrcnn_r50_fpn"], "train.weight_decay": [0.05]})
    config = {"train.lr": 2e-4, **space(Fixed({"train.lr": 2e-4}, number=0))}
    t = sampled_trial(space, config)
    assert (t.trial_id, t.model, t.train.weight_decay) == ("s000-fasterrcnn_r50_fpn-full-lr0.0002",
                                                           "fasterrcnn_r50_fpn", 0.05)
    assert t.axes == {"train.weight_decay": 0.05, "train.lr": 2e-4}


def test_dry_run_text():
    text = describe(space_of(), concurrency=2)
    assert text.splitlines()[0] == ("24 trials sampled from this space (Optuna tpe sampler, seed 0), objectives "
                                    "ap:max, trainable_params:min, up to 2 at once:")
    assert "  train.lr    loguniform [1e-05, 0.0003]" in text
    assert "  lora.rank   choice [2, 4, 8, 16, 32] (under lora_only)" in text
    assert text.splitlines()[-1] == "trial ids read like s007-detr_r18-lora_only-r8-a16-lr5.5e-05"


def test_resume_refuses_a_changed_search(tmp_path):
    root = str(tmp_path)
    with pytest.raises(SweepError, match="search.json is missing"):
        check_search_resume(root, sweep_with())
    save_search(root, sweep_with())
    check_search_resume(root, sweep_with())  # unchanged
    changed = sweep_with({**SPACE, "train.lr": {"loguniform": [1e-5, 1e-3]}})
    with pytest.raises(SweepError, match=r"^--resume: the search changed since the run in .* started: search.space "
                                         r"was .*; pass --fresh"):
        check_search_resume(root, changed)
    (tmp_path / "tune").mkdir()
    (tmp_path / "tune" / "searcher-state-2026-01-01_00-00-00.pkl").write_bytes(b"")
    with pytest.raises(SweepError, match=r"searcher-state-2026-01-01_00-00-00.pkl is cut short: the driver stopped "
                                         r"while Ray was writing Tune's state"):
        check_search_resume(root, sweep_with())
