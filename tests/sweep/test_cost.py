"""Cost in dollars: flat prices and node-type shares, fractional GPUs, the checks at load, the --dry-run
estimate, and a front with cost as an objective."""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import yaml

from detsweep.sweep import SweepError, expand, parse_sweep
from detsweep.sweep.cost import Pricing, check_trials, estimate_line, pricing
from detsweep.sweep.spec import CostConfig, ResourcesConfig

CLUSTER = {"available_node_types": {"head": {"resources": {"CPU": 0}},
                                    "cpu": {"resources": {"CPU": 16}},
                                    "gpu": {"resources": {"CPU": 48, "GPU": 4}}}}


def res(workers: int, cpus: float, gpus: float) -> ResourcesConfig:
    return ResourcesConfig(ddp_workers=workers, cpus_per_worker=cpus, gpus_per_worker=gpus)


@pytest.fixture
def cluster_file(tmp_path) -> Path:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(CLUSTER, sort_keys=False))
    return path


@pytest.mark.parametrize("resources, worker_s, usd", [
    (res(2, 6, 1), 3600, 2 * 1.006 + 12 * 0.048),  # 2 whole GPUs and 12 CPUs for an hour
    (res(1, 6, 0.5), 1800, (0.5 * 1.006 + 6 * 0.048) / 2),  # half a GPU for half an hour
    (res(1, 2, 0.25), 7200, 2 * (0.25 * 1.006 + 2 * 0.048)),  # a quarter GPU
    (res(2, 1, 0), 900, 2 * 0.048 / 4),  # CPU only
    (res(2, 1, 0), 0, 0.0),
])
def test_flat_prices(resources, worker_s, usd):
    prices = Pricing(usd_per_gpu_hour=1.006, usd_per_cpu_hour=0.048)
    assert prices.trial_usd(resources, worker_s) == pytest.approx(usd)


@pytest.mark.parametrize("resources, usd_per_hour", [
    (res(1, 6, 0.5), 5.672 * 0.125),  # half a GPU of 4, 6 CPUs of 48: an eighth of the node
    (res(1, 40, 1), 5.672 * 40 / 48),  # one GPU but most CPUs: the CPUs' share is charged
    (res(2, 12, 4), 5.672 * 2),  # two whole nodes
    (res(2, 4, 0), 0.68 * 8 / 16),  # CPU only: on the CPU node type
])
def test_node_type_shares(cluster_file, resources, usd_per_hour):
    prices = pricing(CostConfig(node_types={"gpu": 5.672, "cpu": 0.68}, cluster=str(cluster_file)), "f.yaml")
    assert prices.usd_per_hour(resources) == pytest.approx(usd_per_hour)
    assert prices.trial_usd(resources, 1800) == pytest.approx(usd_per_hour / 2)


def test_a_cpu_trial_without_a_priced_cpu_node_runs_on_the_gpu_node(cluster_file):
    prices = pricing(CostConfig(node_types={"gpu": 5.672}, cluster=str(cluster_file)), "f.yaml")
    assert prices.usd_per_hour(res(1, 12, 0)) == pytest.approx(5.672 / 4)


def test_no_prices_no_cost():
    assert pricing(CostConfig(), "f.yaml") is None
    assert pricing(CostConfig(usd_per_gpu_hour=1.0), "f.yaml") == Pricing(usd_per_gpu_hour=1.0)


@pytest.mark.parametrize("cost, message", [
    ({"usd_per_gpu_hour": -1.0}, "f.yaml: cost.usd_per_gpu_hour: -1.0 must be a price >= 0 (USD per hour)"),
    ({"node_types": {"gpu": -2}}, "f.yaml: cost.node_types.gpu: -2.0 must be a price >= 0 (USD per hour)"),
    ({"usd_per_gpu_hour": 1.0, "node_types": {"gpu": 5.0}},
     "f.yaml: cost.node_types: give either node_types or the flat usd_per_gpu_hour/usd_per_cpu_hour, not both "
     "(a trial would have two prices)"),
    ({"node_types": {"g5": 5.0}}, "f.yaml: cost.node_types.g5: not a node type of {cluster}; its node types are "
                                  "['head', 'cpu', 'gpu']"),
    ({"node_types": {"gpu": 5.0}, "cluster": "nowhere.yaml"},
     "f.yaml: cost.cluster: 'nowhere.yaml' is not a file (cost.node_types needs the node types' resources from "
     "cluster.yaml's available_node_types)"),
    ({"expected_minutes": 0}, "f.yaml: cost.expected_minutes: 0.0 must be > 0"),
    ({"usd_per_gpu_hour": "cheap"}, "f.yaml: cost.usd_per_gpu_hour: 'cheap' must be of type float"),
    ({"dollars": 1}, "f.yaml: cost.dollars: unknown key; allowed keys are ['usd_per_gpu_hour', 'usd_per_cpu_hour', "
                     "'node_types', 'cluster', 'expected_minutes']"),
])
def test_bad_cost_sections_fail_at_load(cluster_file, cost, message):
    cost = {"cluster": str(cluster_file), **cost}
    with pytest.raises(SweepError) as e:
        parse_sweep({"name": "x", "cost": cost}, "f.yaml", check_paths=False)
    assert str(e.value) == message.format(cluster=cluster_file)


def test_an_ambiguous_node_type_is_refused_before_ray(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump({"available_node_types": {"a10": {"resources": {"CPU": 48, "GPU": 4}},
                                                             "a100": {"resources": {"CPU": 96, "GPU": 8}}}}))
    sweep = parse_sweep({"name": "x", "resources": {"ddp_workers": 1, "cpus_per_worker": 4, "gpus_per_worker": 1},
                         "cost": {"node_types": {"a10": 5.672, "a100": 32.8}, "cluster": str(path)}},
                        "f.yaml", check_paths=False)
    with pytest.raises(SweepError, match=r"^f.yaml: cost.node_types: trial 'detr_r50-full': 4 CPU and 1 GPU per "
                                         r"worker fits node types \['a10', 'a100'\], so its price is ambiguous"):
        check_trials(pricing(sweep.cost, "f.yaml"), expand(sweep), "f.yaml")


def test_the_dry_run_estimate():
    sweep = parse_sweep({"name": "x", "grid": {"regime": ["full", "lora_only"]},
                         "resources": {"ddp_workers": 2, "cpus_per_worker": 6, "gpus_per_worker": 1},
                         "resources_by_regime": {"lora_only": {"ddp_workers": 1, "gpus_per_worker": 0.5}},
                         "cost": {"usd_per_gpu_hour": 1.0, "usd_per_cpu_hour": 0.0, "expected_minutes": 30}},
                        "f.yaml", check_paths=False)
    trials = expand(sweep)
    prices = pricing(sweep.cost, "f.yaml")
    assert estimate_line(prices, 30, trials) == (
        "cost estimate: $1.25 for 2 trials of 30 min each (detr_r50-full $1.00, detr_r50-lora_only-r8-attention_only "
        "$0.25)")
    assert estimate_line(prices, 30, trials, num_samples=4) == (
        "cost estimate: $1.00 to $4.00 for 4 trials of 30 min each (per trial: detr_r50-full $1.00, "
        "detr_r50-lora_only-r8-attention_only $0.25)")
    assert estimate_line(prices, None, trials) is None and estimate_line(None, 30, trials) is None


def _row(trial_id: str, ap: float, usd: float | None, status: str = "ok") -> dict:
    t = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    return {"sweep": "s", "trial_id": trial_id, "status": status, "regime": "full", "ap": ap, "cost_usd": usd,
            "worker_s": 100.0, "gpu_hours": 0.1, "started_at": t, "finished_at": t}


def test_a_front_in_dollars(tmp_path, capsys):
    """`detsweep.frontier --objectives ap:max,cost_usd:min` ranks on cost; report.md totals it."""
    from detsweep import frontier
    from detsweep.results import ResultsStore

    store = ResultsStore(str(tmp_path))
    for row in [_row("cheap", 0.2, 0.5), _row("dear", 0.4, 2.0), _row("worse", 0.1, 1.0),
                _row("failed", None, None, status="error")]:
        store.upsert_trial(row)
    assert frontier.main([store.results_uri, "--objectives", "ap:max,cost_usd:min", "--no-plots", "--no-html"]) == 0
    import pyarrow.parquet as pq

    ranks = {r["trial_id"]: r["pareto_rank"] for r in pq.read_table(tmp_path / "frontier.parquet").to_pylist()}
    assert ranks == {"cheap": 1, "dear": 1, "worse": 2, "failed": None}
    report = (tmp_path / "report.md").read_text()
    assert "- cost: $3.50 in total, $1.17 per trial on average (min $0.50, max $2.00; 3 priced trials of 4" in report
    assert "## Cost per trial" in report and "| dear | full | ok | 100 | 0.1 | $2.00 |" in report
