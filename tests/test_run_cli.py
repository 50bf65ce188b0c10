"""The CLI's flags, its concurrency plan, trial ids as folder names, and --resume's trial-list check.

Nothing here starts Ray: every CLI run stops before `ray.init` (tests/ray covers the real run).
"""
from __future__ import annotations

import dataclasses
import json
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from detsweep import run
from detsweep.sweep import SweepError, TrialConfig, expand, load_sweep, parse_sweep
from detsweep.sweep.grid import id_value
from detsweep.sweep.search import cells, parse_space
from detsweep.sweep import resume
from detsweep.sweep.resume import trials_change

REPO = Path(__file__).resolve().parents[1]
SAFE_ID = re.compile(r"^[A-Za-z0-9._=-]+$")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "detsweep.run", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


def _g5_12xlarge() -> str:
    """cluster.yaml's GPU worker (a g5.12xlarge) as an --assume-resources spec."""
    node = yaml.safe_load((REPO / "cluster.yaml").read_text())["available_node_types"]["gpu"]
    assert node["node_config"]["InstanceType"] == "g5.12xlarge"
    return ",".join(f"{k}={v}" for k, v in node["resources"].items())


# ------------------------------------------------------------------------------------------------
# 1. Flags: one line, exit status 2, before the sweep file is read and before Ray starts.
# ------------------------------------------------------------------------------------------------
BAD_FLAGS = [
    (["--dry-run", "--max-concurrent", "-3"], "error: --max-concurrent: -3 must be >= 1 (trials at once)"),
    (["--dry-run", "--max-concurrent", "0"], "error: --max-concurrent: 0 must be >= 1 (trials at once)"),
    (["--max-concurrent", "0"], "error: --max-concurrent: 0 must be >= 1 (trials at once)"),
    (["--dry-run", "--max-concurrent", "two"],
     "error: argument --max-concurrent: invalid int value: 'two' (see --help)"),
    (["--dry-run", "--assume-resources", "CPU=-5"],
     "error: --assume-resources: 'CPU=-5': CPU must be > 0 (e.g. CPU=48,GPU=4)"),
    (["--dry-run", "--assume-resources", "CPU=0,GPU=4"],
     "error: --assume-resources: 'CPU=0': CPU must be > 0 (e.g. CPU=48,GPU=4)"),
    (["--dry-run", "--assume-resources", "CPU=8,GPU=-1"],
     "error: --assume-resources: 'GPU=-1': GPU must be >= 0 (e.g. CPU=48,GPU=4)"),
    (["--dry-run", "--assume-resources", "GPU=4"],
     "error: --assume-resources: 'GPU=4' gives no CPU; a cluster needs CPU=N with N > 0 (e.g. CPU=48,GPU=4)"),
    (["--dry-run", "--assume-resources", "CPU=4,CPU=8"], "error: --assume-resources: 'CPU=4,CPU=8' gives CPU twice"),
    (["--dry-run", "--assume-resources", "CPU=inf"],
     "error: --assume-resources: 'CPU=inf' is not CPU=N or GPU=M (e.g. CPU=48,GPU=4)"),
    (["--dry-run", "--assume-resources", "TPU=4"],
     "error: --assume-resources: 'TPU=4' is not CPU=N or GPU=M (e.g. CPU=48,GPU=4)"),
    (["--assume-resources", "CPU=48,GPU=4"],
     "error: --assume-resources only applies with --dry-run; a run uses the resources of the cluster Ray finds"),
    (["--resume", "--max-concurrent", "2"],
     "error: --max-concurrent does not apply with --resume: Tune keeps the earlier run's value (--fresh starts "
     "over with a new one)"),
    (["--resume", "--fresh"], "error: --resume and --fresh exclude each other"),
]


@pytest.mark.parametrize("flags, line", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_a_bad_flag_is_one_line_and_exit_status_2(flags, line, capsys):
    try:
        status = run.main(["sweeps/smoke.yaml", *flags])
    except SystemExit as e:  # argparse's own errors (a flag's type)
        status = e.code
    out = capsys.readouterr()
    assert status == 2
    assert out.err.splitlines() == [line]
    assert out.out == ""


def test_a_bad_flag_from_the_shell_has_no_traceback():
    out = _cli("sweeps/smoke.yaml", "--max-concurrent", "-3")
    assert out.returncode == 2
    assert out.stderr.splitlines() == ["error: --max-concurrent: -3 must be >= 1 (trials at once)"]
    missing = _cli("--dry-run")
    assert missing.returncode == 2
    assert missing.stderr.splitlines() == ["error: the following arguments are required: sweep (see --help)"]


def test_assumed_resources_default_gpu_to_0():
    assert run._parse_resources("CPU=12") == {"CPU": 12.0, "GPU": 0.0}
    assert run._parse_resources(" GPU = 2 , CPU = 8.5 ") == {"CPU": 8.5, "GPU": 2.0}


# ------------------------------------------------------------------------------------------------
# 2. --dry-run concurrency: what the cluster fits, the set value, and which one Tune uses.
# ------------------------------------------------------------------------------------------------
def test_full_sweep_on_one_g5_12xlarge_uses_its_set_value():
    spec = _g5_12xlarge()
    assert spec == "CPU=48,GPU=4"
    out = _cli("sweeps/full.yaml", "--dry-run", "--assume-resources", spec)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[1] == "cluster: CPU=48, GPU=4 (assumed)"
    assert lines[-2:] == [
        "9 trials, up to 8 at once",
        "concurrency: the cluster fits 8 at once; max_concurrent_trials in sweeps/full.yaml sets 8; "
        "Tune uses 8 (the set value)"]
    assert out.stderr == ""  # every trial fits: no warning


def _dry_run(capsys, *args: str) -> tuple[list[str], list[str]]:
    assert run.main([*args, "--dry-run"]) == 0
    out = capsys.readouterr()
    return out.out.splitlines(), out.err.splitlines()


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)


def test_full_sweep_where_no_trial_fits_warns_and_keeps_the_set_value(in_repo, capsys):
    out, err = _dry_run(capsys, "sweeps/full.yaml", "--assume-resources", "CPU=2,GPU=0")
    assert out[-2:] == [
        "9 trials, up to 8 at once",
        "concurrency: the cluster fits 0 at once; max_concurrent_trials in sweeps/full.yaml sets 8; "
        "Tune uses 8 (the set value)"]
    assert err == [
        "warning: 9 of 9 trials fit 0 times on CPU=2, GPU=0 (assumed), first 'detr_r50-full' (needs CPU=16, GPU=2); "
        "Ray queues them until the cluster has room for their workers (an autoscaling cluster adds nodes)"]


def test_full_sweep_where_only_lora_trials_fit_names_the_first_that_does_not(in_repo, capsys):
    out, err = _dry_run(capsys, "sweeps/full.yaml", "--assume-resources", "CPU=8,GPU=1")
    assert out[-1] == ("concurrency: the cluster fits 2 at once; max_concurrent_trials in sweeps/full.yaml sets 8; "
                       "Tune uses 8 (the set value)")
    assert err == [
        "warning: 3 of 9 trials fit 0 times on CPU=8, GPU=1 (assumed), first 'detr_r50-full' (needs CPU=16, GPU=2); "
        "Ray queues them until the cluster has room for their workers (an autoscaling cluster adds nodes)"]


def test_max_concurrent_flag_overrides_the_sweep_files_value(in_repo, capsys):
    out, err = _dry_run(capsys, "sweeps/full.yaml", "--assume-resources", "CPU=48,GPU=4", "--max-concurrent", "3")
    assert out[-2:] == [
        "9 trials, up to 3 at once",
        "concurrency: the cluster fits 8 at once; --max-concurrent sets 3 (over 8 from max_concurrent_trials in "
        "sweeps/full.yaml); Tune uses 3 (the set value)"]
    assert err == []


@pytest.mark.parametrize("cluster, computed", [("CPU=48,GPU=4", 15), ("CPU=5", 2)])
def test_a_sweep_without_a_set_value_uses_the_computed_one(in_repo, capsys, cluster, computed):
    out, err = _dry_run(capsys, "sweeps/smoke.yaml", "--assume-resources", cluster)
    assert out[-2:] == [  # smoke: 15 trials of 2 workers x 1 CPU
        f"15 trials, up to {computed} at once",
        f"concurrency: the cluster fits {computed} at once; max_concurrent_trials is not set; "
        f"Tune uses {computed} (the computed value)"]
    assert err == []


def test_a_sweep_without_a_set_value_where_no_trial_fits_says_a_run_would_stop(in_repo, capsys):
    out, err = _dry_run(capsys, "sweeps/smoke.yaml", "--assume-resources", "CPU=1")
    assert out[-1] == ("concurrency: the cluster fits 0 at once; max_concurrent_trials is not set; "
                       "Tune uses 1 (at least 1)")
    assert err == [
        "warning: 15 of 15 trials fit 0 times on CPU=1, GPU=0 (assumed), first 'detr_r18-full' (needs CPU=2, GPU=0); "
        "a run on this cluster stops with an error; lower resources in sweeps/smoke.yaml, or set "
        "max_concurrent_trials (or --max-concurrent) for a cluster that autoscales"]


# ------------------------------------------------------------------------------------------------
# 3-4. Trial ids: safe folder names, independent of the grid's key order, unchanged for shipped sweeps.
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, part", [
    ("/ckpt/detr-r50-e132384.pth", "detr-r50-e132384"),
    ("s3://bucket/ckpt/model.v2.pth", "model.v2"),
    ("/data/coco10/", "coco10"),
    ("/etc/x", "x"),
    ("a b", "a_b"),
    ("a  \t:b", "a_b"),
    ("weights=coco", "weights=coco"),
    ("é", "_"),
    ("/", "_"),
    (["cat", "dog"], "_cat_dog_"),
    (1e-4, "0.0001"),
    (1e-05, "1e-05"),
    (True, "True"),
    (6, "6"),
])
def test_id_value_is_filesystem_safe(value, part):
    assert id_value(value) == part


def test_string_axes_give_safe_ids():
    sweep = parse_sweep({"name": "s", "grid": {"model.detr.weights": ["/etc/x", "a b", "/ckpt/detr-r50-e132384.pth"],
                                               "data.root": ["~/data/syn 1", "/tmp/syn:2"]}},
                        "f.yaml", check_paths=False)
    ids = [t.trial_id for t in expand(sweep)]
    assert ids == [f"detr_r50-full-root{r}-weights{w}" for w in ("x", "a_b", "detr-r50-e132384")
                   for r in ("syn_1", "syn_2")]  # grid order; id parts sorted by dotted key
    assert all(SAFE_ID.match(i) for i in ids)


@pytest.mark.parametrize("key, values, line", [
    ("model.detr.weights", ["/a/detr.pth", "/b/detr.pth"],
     "f.yaml: grid: two different trials would share the id 'detr_r50-full-weightsdetr': grid.model.detr.weights "
     "values '/a/detr.pth' and '/b/detr.pth' both read 'detr' in a trial id (a path reads as its file stem); make "
     "the values distinguishable"),
    ("data.root", ["a b", "a_b"],
     "f.yaml: grid: two different trials would share the id 'detr_r50-full-roota_b': grid.data.root values 'a b' "
     "and 'a_b' both read 'a_b' in a trial id; make the values distinguishable"),
    ("train.lr", [1e-4, 1.00000001e-4],
     "f.yaml: grid: two different trials would share the id 'detr_r50-full-lr0.0001': grid.train.lr values "
     "0.0001 and 0.000100000001 both read '0.0001' in a trial id; make the values distinguishable"),
])
def test_values_that_read_alike_in_an_id_are_an_error_naming_them(key, values, line):
    with pytest.raises(SweepError) as e:
        expand(parse_sweep({"name": "s", "grid": {key: values}}, "f.yaml", check_paths=False))
    assert str(e.value) == line


def test_ids_do_not_depend_on_the_grids_key_order():
    axes = {"train.seed": [0, 1], "model.detr.dec_layers": [6, 3], "train.lr": [1e-4, 2e-4]}
    one = expand(parse_sweep({"name": "s", "grid": {"regime": ["full"], **axes}}))
    other = expand(parse_sweep({"name": "s", "grid": {**dict(reversed(list(axes.items()))), "regime": ["full"]}}))
    assert sorted(t.trial_id for t in one) == sorted(t.trial_id for t in other)
    assert one[0].trial_id == "detr_r50-full-dec_layers6-lr0.0001-seed0"
    lora = expand(parse_sweep({"name": "s", "grid": {"train.seed": [0, 1], "regime": ["lora_only"],
                                                     "lora.rank": [4, 8]}}))
    assert [t.trial_id for t in lora][:2] == ["detr_r50-lora_only-r4-attention_only-seed0",
                                              "detr_r50-lora_only-r8-attention_only-seed0"]


SHIPPED_IDS = {  # `--dry-run` of each shipped sweep before ids were made safe and order-free
    "ablation_queries": ["detr_r50-full-dec_layers6-num_queries100", "detr_r50-full-dec_layers6-num_queries50",
                         "detr_r50-full-dec_layers3-num_queries100", "detr_r50-full-dec_layers3-num_queries50"],
    "coco10": [f"{m}-{s}" for m in ("detr_r50-full", "detr_r50-lora_only-r8-attention_ffn", "detr_r50-partial",
                                   "fasterrcnn_r50_fpn-full") for s in ("seed0", "seed1", "seed2")],
    "full": ["detr_r50-full"] + [f"detr_r50-lora_only-r{r}-{p}" for r in (4, 8, 16)
                                 for p in ("attention_only", "attention_ffn")]
            + ["detr_r50-partial", "fasterrcnn_r50_fpn-full"],
    "learnable": ["fasterrcnn_r18_fpn-full"],
    "search": ["detr_r18-full", "detr_r18-lora_only", "detr_r18-partial"],  # its cells; the trials are sampled
    "smoke": ["detr_r18-full"] + [f"detr_r18-lora_only-r{r}-{p}" for r in (4, 8)
                                  for p in ("attention_only", "attention_ffn", "decoder_only", "qv_only")]
             + ["detr_r18-partial", "fasterrcnn_r18_fpn-full",
                # extra_trials: each names the keys it sets
                "detr_dinov2_vits14-lora_only-r4-backbone_attention_transformer",
                "detr_r18-two_stage-epochs1-regimefull", "fasterrcnn_r18_fpn-lora_only-r4-box_head",
                "detr_r18-full-augmentphotometric"],
    "demo": ["detr_r18-full", "detr_r18-lora_only-r4-attention_ffn", "detr_r18-partial", "fasterrcnn_r18_fpn-full",
             "fasterrcnn_r18_fpn-lora_only-r4-box_head", "fasterrcnn_r18_fpn-partial"],
    "demo_long": ["detr_r18-full", "detr_r18-lora_only-r4-attention_ffn", "detr_r18-partial"],
    "vit": ["detr_dinov2_vits14-full", "detr_dinov2_vits14-lora_only-r16-backbone_attention",
            "detr_dinov2_vits14-lora_only-r16-attention_only",
            "detr_dinov2_vits14-lora_only-r16-backbone_attention_transformer", "detr_dinov2_vits14-two_stage",
            "detr_dinov2_vits14-two_stage-r16-backbone_attention_transformer-lr0.0001-regimelora_only"],
}


def test_shipped_sweeps_keep_their_ids():
    assert sorted(p.stem for p in (REPO / "sweeps").glob("*.yaml")) == sorted(SHIPPED_IDS)
    for name, ids in SHIPPED_IDS.items():
        sweep = load_sweep(REPO / "sweeps" / f"{name}.yaml", check_paths=False)
        trials = expand(sweep) if sweep.search is None else cells(parse_space(sweep, check_paths=False))
        assert [t.trial_id for t in trials] == ids


# ------------------------------------------------------------------------------------------------
# 5. <root>/trials.json and --resume.
# ------------------------------------------------------------------------------------------------
def _smoke_trials(storage: Path, **changes: object) -> list[TrialConfig]:
    """sweeps/smoke.yaml's trials as `--output-dir storage` plans them, with top-level sections changed."""
    sweep = load_sweep(REPO / "sweeps" / "smoke.yaml")
    return expand(dataclasses.replace(sweep, storage=str(storage), **changes))


def test_trials_json_round_trips_and_leaves_no_temporary_file(tmp_path):
    trials = _smoke_trials(tmp_path)
    root = str(tmp_path / "smoke")
    resume.save_trials(root, trials, 4)
    assert sorted(p.name for p in (tmp_path / "smoke").iterdir()) == ["trials.json"]
    saved = json.loads((tmp_path / "smoke" / "trials.json").read_text())
    assert saved["max_concurrent_trials"] == 4
    assert [t["trial_id"] for t in saved["trials"]] == [t.trial_id for t in trials]
    assert [TrialConfig.from_dict(t["config"]) for t in saved["trials"]] == trials  # plain JSON, complete
    assert resume.check_resume(root, trials) == 4
    resume.save_trials(root, trials[:3], None)  # rewritten in place
    assert resume.load_trials(root)["max_concurrent_trials"] is None
    assert len(resume.load_trials(root)["trials"]) == 3


def test_trials_json_goes_through_pyarrow_filesystems_for_uris(tmp_path):
    trials = _smoke_trials(tmp_path)
    root = f"file://{tmp_path}/smoke"
    resume.save_trials(root, trials, 2)
    assert resume.load_trials(root) == json.loads((tmp_path / "smoke" / "trials.json").read_text())
    assert resume.check_resume(root, trials) == 2


def test_trials_change_names_the_first_difference_and_ignores_order(tmp_path):
    trials = _smoke_trials(tmp_path)
    saved = json.loads(json.dumps([{"trial_id": t.trial_id, "config": t.to_dict()} for t in trials]))
    assert trials_change(saved, trials) is None
    assert trials_change(list(reversed(saved)), trials) is None
    assert trials_change(saved[:-1], trials) == "trial 'detr_r18-full-augmentphotometric' is new"
    assert trials_change(saved, trials[1:]) == "trial 'detr_r18-full' is no longer in it"
    # How failures are handled may change between runs (e.g. on_resume_errored: restart after a fix).
    saved[0]["config"]["fault_tolerance"]["on_resume_errored"] = "skip"
    saved[0]["config"]["fault_tolerance"]["max_failures"] = 5
    saved[0]["config"]["data"]["image_check"] = "none"  # a resume may add or drop --skip-image-check
    assert trials_change(saved, trials) is None
    del saved[0]["config"]["detector"]["nheads"]
    assert trials_change(saved, trials) == "trial 'detr_r18-full': model.detr.nheads was absent, is now 4"


def test_resume_ignores_keys_of_the_other_model_family(tmp_path):
    """A trial holds only its own family's settings: a Faster R-CNN key changed under a sweep whose
    trials are all DETR does not refuse --resume (it once read `faster_rcnn.min_size was 800, is now
    600`); a key the trials really use still does."""
    detr_only = {"model": ("detr_r50",), "regime": ("full", "partial")}
    trials = _smoke_trials(tmp_path, grid=detr_only, extra_trials=())
    root = _earlier_run(tmp_path, trials)
    sweep = load_sweep(REPO / "sweeps" / "smoke.yaml")
    other_family = dataclasses.replace(sweep.model, faster_rcnn=dataclasses.replace(sweep.model.faster_rcnn,
                                                                                    min_size=600))
    assert resume.check_resume(str(root), _smoke_trials(tmp_path, grid=detr_only, model=other_family,
                                                        extra_trials=())) == 2
    own_family = dataclasses.replace(sweep.model, detr=dataclasses.replace(sweep.model.detr, num_queries=7))
    with pytest.raises(SweepError, match=r"trial 'detr_r18-full': model.detr.num_queries was \d+, is now 7"):
        resume.check_resume(str(root), _smoke_trials(tmp_path, grid=detr_only, model=own_family, extra_trials=()))


def _refused_resume(tmp_path: Path) -> list[str]:
    """`--resume` of the smoke sweep in `tmp_path`: it must exit 2 before Ray starts (nothing on
    stdout, no plan); returns its stderr lines."""
    out = _cli("sweeps/smoke.yaml", "--output-dir", str(tmp_path), "--resume")
    assert out.returncode == 2 and out.stdout == ""
    return out.stderr.splitlines()


def _earlier_run(tmp_path: Path, trials: list[TrialConfig]) -> Path:
    root = tmp_path / "smoke"
    (root / "tune").mkdir(parents=True)
    resume.save_trials(str(root), trials, 2)
    return root


def test_resume_with_a_changed_config_stops_before_ray_starts(tmp_path):
    sweep = load_sweep(REPO / "sweeps" / "smoke.yaml")
    root = _earlier_run(tmp_path, _smoke_trials(tmp_path, train=dataclasses.replace(sweep.train, lr=2e-4)))
    assert _refused_resume(tmp_path) == [
        f"error: --resume: the sweep changed since the run in {root} started: trial 'detr_r18-full': train.lr was "
        f"0.0002, is now 0.0001; pass --fresh to start over, or --output-dir for another folder"]


def test_resume_with_a_changed_grid_stops_before_ray_starts(tmp_path):
    sweep = load_sweep(REPO / "sweeps" / "smoke.yaml")
    root = _earlier_run(tmp_path, _smoke_trials(tmp_path, grid={**sweep.grid, "lora.rank": (4, 16)}))
    assert _refused_resume(tmp_path) == [
        f"error: --resume: the sweep changed since the run in {root} started: trial "
        f"'detr_r18-lora_only-r16-attention_only' is no longer in it; pass --fresh to start over, or --output-dir "
        f"for another folder"]


def test_resume_with_an_unreadable_trial_list_stops_before_ray_starts(tmp_path):
    root = tmp_path / "smoke"
    (root / "tune").mkdir(parents=True)
    (root / "trials.json").write_text('{"trials": "none"}')
    assert _refused_resume(tmp_path) == [
        f"error: --resume: {root / 'trials.json'} is not a trial list saved by detsweep (no list of "
        f"{{trial_id, config}}); pass --fresh to start over, or --output-dir for another folder"]


def test_resume_of_a_run_without_a_trial_list_stops_before_ray_starts(tmp_path):
    root = tmp_path / "smoke"
    (root / "tune").mkdir(parents=True)
    assert _refused_resume(tmp_path) == [
        f"error: --resume: {root / 'trials.json'} is missing, so the trials this run started with are unknown "
        f"(a run from an older detsweep); pass --fresh to start over, or --output-dir for another folder"]


def test_resume_of_a_run_whose_tuner_pickle_is_cut_short_stops_before_ray_starts(tmp_path):
    root = _earlier_run(tmp_path, _smoke_trials(tmp_path))
    (root / "tune" / "tuner.pkl").write_bytes(pickle.dumps({"param_space": list(range(20))})[:-4])
    assert _refused_resume(tmp_path) == [
        f"error: --resume: {root / 'tune' / 'tuner.pkl'} is cut short: the driver stopped while Ray was writing it, "
        f"and Tune cannot restore the run (the finished trials are in results.parquet); pass --fresh to start over, "
        f"or --output-dir for another folder"]


def test_resume_of_a_grid_whose_searcher_state_is_cut_short_warns_and_goes_on(tmp_path, capsys):
    """Tune then restarts the grid's trials, and each continues from its own Train run (tests/ray/test_bases.py
    runs it)."""
    trials = _smoke_trials(tmp_path)
    root = _earlier_run(tmp_path, trials)
    (root / "tune" / "tuner.pkl").write_bytes(pickle.dumps({"param_space": 1}))
    state = root / "tune" / "basic-variant-state-2026-12-03_08-04-08.json"
    state.write_bytes(pickle.dumps({"counter": 2})[:-1])
    sweep = load_sweep(REPO / "sweeps" / "smoke.yaml")
    args = run.parse_args(["sweeps/smoke.yaml", "--resume"])
    assert run.guard_earlier_run(sweep, trials, str(root), args) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"warning: --resume: {state} is cut short (the driver stopped while Ray was writing it): Tune starts the "
        f"sweep's trials again, and each continues from its last Train checkpoint (a finished trial reports its "
        f"final metrics again)"]


def test_a_worker_bigger_than_every_node_is_unfit_though_the_total_fits(tmp_path):
    from detsweep.sweep.plan import unfit

    sweep = parse_sweep({"name": "s", "storage": str(tmp_path), "grid": {"regime": ["full"]},
                         "resources": {"ddp_workers": 2, "cpus_per_worker": 8, "gpus_per_worker": 1}})
    (trial,) = expand(sweep)
    cluster = {"CPU": 16.0, "GPU": 2.0}  # two nodes of CPU=8, GPU=1 hold it; two of CPU=4, GPU=1 do not
    assert unfit([trial], cluster, [{"CPU": 8.0, "GPU": 1.0}] * 2) == []
    small = [{"CPU": 4.0, "GPU": 1.0}] * 4
    assert unfit([trial], cluster, small) == [trial]
    assert unfit([trial], cluster) == []  # totals alone cannot tell
    assert run._unfit_reason(trial, cluster, small) == (
        "trial 'detr_r50-full': one DDP worker needs CPU=8, GPU=1 on one node, but the largest node has "
        "CPU=4, GPU=1")
    assert run._unfit_reason(trial, {"CPU": 8.0, "GPU": 2.0}, small) == (
        "trial 'detr_r50-full' needs CPU=16, GPU=2 but the cluster has CPU=8, GPU=2")
