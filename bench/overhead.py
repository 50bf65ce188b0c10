"""Per-trial overhead of detsweep against Ray's own floor, measured in one run.

Floor: a bare Tune function trainable fitting a TorchTrainer with the same 2 gloo workers and a
no-op loop (one report). detsweep: a one-epoch trial of a tiny DETR through `detsweep.run`; its
overhead is the trial's wall time minus the in-worker train + eval time. Also samples the RSS of
the non-worker processes (Tune trial actor, Train controller) and whether they loaded torch.

    python bench/overhead.py [--repeats 2] [--no-write]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def noop_train_fn(config):  # the floor's worker loop: DDP is set up by Ray, nothing else happens
    import ray.train

    ray.train.report({"noop": 1})


def bare_trial(config):
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    TorchTrainer(noop_train_fn, torch_config=TorchConfig(backend="gloo"),
                 scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                 run_config=ray.train.RunConfig(name=f"bare-{config['i']}", storage_path=config["storage"],
                                                callbacks=[TuneReportCallback()])).fit()


class ProcessSampler(threading.Thread):
    """Peak RSS and USS per role of a trial's processes, and whether each mapped libtorch.

    RSS counts shared library pages once per process; USS (pages no other process maps) is what
    each extra process really costs the node."""

    ROLES = {"trial actor": ("ImplicitFunc",), "train controller": ("TrainController",),
             "train worker": ("RayTrainWorker",)}

    def __init__(self):
        super().__init__(daemon=True)
        self.peak = {r: 0.0 for r in self.ROLES}
        self.peak_uss = {r: 0.0 for r in self.ROLES}
        self.torch = {r: False for r in self.ROLES}
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            for p in psutil.process_iter(["cmdline"]):
                cmd = " ".join(p.info["cmdline"] or [])
                for role, marks in self.ROLES.items():
                    if any(m in cmd for m in marks):
                        try:
                            mem = p.memory_full_info()
                            self.peak[role] = max(self.peak[role], mem.rss / 2**20)
                            self.peak_uss[role] = max(self.peak_uss[role], mem.uss / 2**20)
                            if not self.torch[role]:
                                self.torch[role] = any("libtorch" in m.path for m in p.memory_maps())
                        except (psutil.NoSuchProcess, psutil.AccessDenied):
                            pass
            time.sleep(0.5)


def run_bare(storage: str, i: int) -> float:
    """One floor trial's wall time, taken where detsweep's `wall_s` is taken: Tune's
    on_trial_start -> on_trial_complete, in the driver."""
    import ray.tune

    from detsweep.cluster.tuner import TRIAL_ACTOR_RESOURCES

    class Walls(ray.tune.Callback):
        def __init__(self):
            self.start, self.walls = {}, []

        def on_trial_start(self, iteration, trials, trial, **info):
            self.start[trial.trial_id] = time.time()

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.walls.append(time.time() - self.start[trial.trial_id])

    walls = Walls()
    ray.tune.Tuner(ray.tune.with_resources(bare_trial, TRIAL_ACTOR_RESOURCES),
                   param_space={"i": i, "storage": storage},
                   run_config=ray.tune.RunConfig(name=f"bare-tune-{i}", storage_path=storage, verbose=0,
                                                 callbacks=[walls])).fit()
    (wall,) = walls.walls
    return wall


def run_detsweep(storage: str, i: int, synthetic: str) -> dict:
    import pyarrow.parquet as pq
    import yaml

    from detsweep import run

    sweep = {
        "name": f"overhead{i}",
        "data": {"kind": "synthetic", "root": synthetic, "train_images": 8, "val_images": 4,
                 "image_size": 64, "num_classes": 3},
        "model": {"detr": {"backbone": "resnet18", "num_queries": 8, "hidden_dim": 32, "nheads": 2,
                           "enc_layers": 1, "dec_layers": 1, "dim_feedforward": 64, "dropout": 0.0}},
        "train": {"epochs": 1, "batch_size_per_worker": 2},
        "eval": {"visuals": False},
        "resources": {"ddp_workers": 2, "cpus_per_worker": 1},
        "grid": {"model": ["detr_r50"], "regime": ["full"]},
        "storage": storage,
    }
    path = Path(storage) / f"overhead{i}.yaml"
    path.write_text(yaml.safe_dump(sweep))
    t0 = time.time()
    assert run.main([str(path), "-q"]) == 0
    driver_wall = time.time() - t0
    (row,) = pq.read_table(Path(storage) / f"overhead{i}" / "results.parquet").to_pylist()
    assert row["status"] == "ok", row["error"]
    row["driver_wall"] = driver_wall
    return row


IMPORT_COST = """
import json
import ray.train, ray.tune

def status():
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) / 1024
    return out

before = status()
import torch
after = status()
print(json.dumps({k: after[k] - before[k] for k in before}))
"""


def torch_import_cost() -> dict[str, float]:
    """What `import torch` adds to a process that already imported Ray Train and Tune (MiB):
    all resident memory, its private (anonymous) part, and the shared-library part that every
    process mapping libtorch shares (Linux /proc/self/status)."""
    out = subprocess.run([sys.executable, "-c", IMPORT_COST], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="timed trials of each kind, alternating")
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = ap.parse_args()

    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    sampler = ProcessSampler()
    sampler.start()
    with tempfile.TemporaryDirectory() as tmp:
        synthetic = str(Path(tmp) / "synthetic")
        run_bare(tmp, -1)  # warm-up (first worker start, imports into the page cache): not timed
        run_detsweep(tmp, -1, synthetic)  # and the synthetic data generated
        bare, rows = [], []
        for i in range(args.repeats):  # alternating, so drifting load on shared cores hits both
            bare.append(run_bare(tmp, i))
            rows.append(run_detsweep(tmp, i, synthetic))
    sampler.stop.set()
    ray.shutdown()
    cost = torch_import_cost()

    floor = statistics.median(bare)
    trial_walls = [r["wall_s"] for r in rows]
    work = [r["train_s"] + r["eval_s"] for r in rows]
    overhead = statistics.median(w - k for w, k in zip(trial_walls, work))
    lines = [
        "## Per-trial overhead (bench/overhead.py)",
        "",
        f"Machine: 2-core x86_64 CPU, no GPU, Python {sys.version.split()[0]}; Ray 2.60.0, torch "
        f"{__import__('torch').__version__}. Local Ray with 2 CPUs; 2 DDP workers (gloo), 1 CPU each; "
        f"median of {args.repeats} trials each, alternating, after one untimed warm-up trial of each, "
        f"measured in one run.",
        "",
        "| | seconds |",
        "|---|---|",
        f"| Ray's floor: bare TorchTrainer-in-Tune trial, no-op loop (wall) | {floor:.1f} |",
        f"| detsweep trial wall time (tiny DETR, 1 epoch, 8+4 images) | {statistics.median(trial_walls):.1f} |",
        f"| in-worker train + eval time | {statistics.median(work):.1f} |",
        f"| detsweep overhead = wall − (train + eval) | {overhead:.1f} |",
        f"| **overhead / floor** | **{overhead / floor:.2f}×** (goal ≤ 1.10×) |",
        "",
        "Peak memory of the processes of a trial (MiB), and whether each loaded torch. USS = pages no "
        "other process maps, what one more such process costs the node; RSS also counts the shared "
        "libraries.",
        "",
        "| process | peak RSS MiB | peak USS MiB | torch loaded |",
        "|---|---:|---:|---|",
    ] + [f"| {role} | {sampler.peak[role]:.0f} | {sampler.peak_uss[role]:.0f} | "
         f"{'yes' if sampler.torch[role] else 'no'} |" for role in sampler.ROLES] + [
        "",
        f"`import torch` in a process that already imported Ray Train and Tune adds {cost['VmRSS']:.0f} MiB "
        f"RSS: {cost['RssAnon']:.0f} MiB private (anonymous) memory, which each such process pays, and "
        f"{cost['RssFile']:.0f} MiB of mapped libraries, shared by every process on the node. Goal \"the trial actor and the Train controller never import "
        f"torch\": not met. `ray.train.torch` (home of `TorchTrainer` and `TorchConfig`) imports torch at "
        f"module level, and the trial actor constructs the `TorchTrainer` while the controller unpickles "
        f"its `TorchConfig`; detsweep's own trial function imports torch only inside the worker. Meeting "
        f"it would mean a `DataParallelTrainer` with a torch-free backend in place of `TorchTrainer`.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        from results_md import write_section

        write_section("Per-trial overhead (bench/overhead.py)", text)


if __name__ == "__main__":
    main()
