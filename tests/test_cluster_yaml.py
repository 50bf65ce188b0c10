"""cluster.yaml and constraints.txt: valid the way `ray up` checks it (offline, no AWS calls) and true
to our rules."""

import copy
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
COMMAND_LISTS = ("head_setup_commands", "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
TRIAL_RESOURCE = "detsweep_trial"  # the head-only custom resource that keeps trial actors there
WORKER_ROLE = "detsweep-worker"  # the GPU nodes' instance profile, scoped to the results bucket


def _raw() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def _prepared(raw: dict | None = None) -> dict:
    # prepare_config fills in the AWS provider's defaults.yaml shipped with Ray: no cloud access.
    return prepare_config(copy.deepcopy(raw if raw is not None else _raw()))


def _worker_types(cfg: dict) -> dict:
    return {name: t for name, t in cfg["available_node_types"].items() if name != cfg["head_node_type"]}


def _pins(text: str) -> dict[str, str]:
    """{"torch": "2.14.1", "ray[default,tune,train]": "2.60.0", ...} of every `name==version` in text."""
    return {m[1]: m[2] for m in re.finditer(r"\b(torchvision|torch|ray(?:\[[a-z,]+\])?)==([0-9][0-9a-z.]*)", text)}


def test_validates_like_ray_up():
    validate_config(_prepared())


def test_every_node_type_declares_its_resources():
    raw = _raw()
    for name, node_type in raw["available_node_types"].items():
        assert "resources" in node_type, f"{name}: resources must be explicit, not detected"


def test_head_runs_no_trial_workers():
    cfg = _prepared()
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0
    assert head["resources"].get("GPU", 0) == 0
    assert head["max_workers"] == 0


def test_gpu_workers_scale_from_zero():
    cfg = _prepared()
    workers = _worker_types(cfg)
    assert workers
    for name, node_type in workers.items():
        assert node_type["resources"]["GPU"] >= 1, name
        assert node_type["resources"]["CPU"] >= 1, name
        assert node_type["min_workers"] == 0, name
        assert 1 <= node_type["max_workers"] <= cfg["max_workers"], name


def test_setup_pins_the_same_stack_as_pyproject():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    wanted = _pins(" ".join(deps))
    assert set(wanted) == {"torch", "torchvision", "ray[default,tune,train]"}
    cfg = _prepared()
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert _pins(" ".join(cfg[key])) == wanted, key


def test_trial_actors_can_be_kept_on_the_head_by_a_resource_only_it_has():
    # The trial actor and its Train controller belong on the head: a GPU node that scales down or is
    # preempted would take the trial with it (docs/cluster.md, "Trial actors on the head").
    cfg = _prepared()
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"].get(TRIAL_RESOURCE, 0) >= 1
    for name, node_type in _worker_types(cfg).items():
        assert TRIAL_RESOURCE not in node_type["resources"], name


def _constraints() -> dict[str, str]:
    lines = [ln.strip() for ln in (ROOT / "constraints.txt").read_text().splitlines()]
    pins = [ln for ln in lines if ln and not ln.startswith("#")]
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[0-9][0-9A-Za-z.+!\-]*", p) for p in pins), pins
    return {name.lower().replace("_", "-"): version for name, version in (p.split("==") for p in pins)}


def test_constraints_pin_the_same_stack_as_pyproject_and_not_detsweep():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    wanted = {re.sub(r"\[.*\]", "", name): version for name, version in _pins(" ".join(deps)).items()}
    pinned = _constraints()
    assert {name: pinned.get(name) for name in wanted} == wanted
    assert "detsweep" not in pinned  # the editable checkout itself is installed from ~/detsweep
    assert {"faster-coco-eval", "pycocotools", "numpy", "nvidia-nccl-cu13"} <= set(pinned)


def test_every_node_installs_with_the_constraints_and_the_fast_extra():
    cfg = _prepared()
    for key in ("head_setup_commands", "worker_setup_commands"):
        installs = [c for c in cfg[key] if "pip install" in c and "uv==" not in c and "boto3" not in c]
        assert installs, key
        for command in installs:
            assert "-c ~/detsweep/constraints.txt" in command, (key, command)
        assert any("-e ~/detsweep'[fast]'" in c for c in installs), key  # eval.backend: faster_coco_eval


def test_gpu_workers_fail_fast_before_copying_coco():
    cfg = _prepared()
    commands = cfg["worker_setup_commands"]
    smi = commands.index("nvidia-smi")
    (torch_check,) = [i for i, c in enumerate(commands) if "torch.cuda.is_available()" in c]
    (sync,) = [i for i, c in enumerate(commands) if "aws s3 sync" in c]
    assert "assert torch.cuda.is_available()" in commands[torch_check] and "device='cuda'" in commands[torch_check]
    assert max(i for i, c in enumerate(commands) if "pip install" in c) < smi < torch_check < sync
    assert not any("nvidia-smi" in c for c in cfg["head_setup_commands"])  # the head has no GPU


def test_gpu_workers_start_ray_with_nccl_p2p_disabled():
    cfg = _prepared()
    (start,) = [c for c in cfg["worker_start_ray_commands"] if " start " in c]
    assert "NCCL_P2P_DISABLE=1" in start  # ray-project/ray#39471 on g5's PCIe-only GPUs


def test_gpu_workers_have_their_own_role_and_the_guide_scopes_it_to_the_bucket():
    cfg = _prepared()
    for name, node_type in _worker_types(cfg).items():
        assert node_type["node_config"]["IamInstanceProfile"] == {"Name": WORKER_ROLE}, name
    guide = (ROOT / "docs" / "cluster.md").read_text()
    bucket = re.search(r"s3://([a-z0-9.\-]+)/coco2017", " ".join(cfg["worker_setup_commands"]))[1]
    assert WORKER_ROLE in guide and f"arn:aws:s3:::{bucket}/results/*" in guide
    assert f"arn:aws:s3:::{bucket}/coco2017/*" in guide and f"arn:aws:s3:::{bucket}/*" not in guide


def test_the_guide_says_what_to_check_on_the_first_gpu_node():
    guide = (ROOT / "docs" / "cluster.md").read_text()
    for needle in ("bench/gpu_check.py --out /tmp/gc", "--only env,nccl", "NCCL_P2P_DISABLE", "sm75",
                   "580", "constraints.txt", "faster_coco_eval", TRIAL_RESOURCE, "create-image"):
        assert needle in guide, needle


def test_nodes_run_this_checkout_in_a_python311_venv():
    cfg = _prepared()
    assert cfg["file_mounts"]["~/detsweep"] == "."
    for key in ("head_setup_commands", "worker_setup_commands"):
        commands = " ".join(cfg[key])
        assert "--python 3.11" in commands and "pip install --quiet -e ~/detsweep" in commands, key
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert any("~/detsweep/.venv/bin/ray start" in c for c in cfg[key]), key


def test_commands_are_whole_shell_lines():
    # A " #" inside an unquoted YAML scalar starts a comment and silently cuts the command.
    cfg = _prepared()
    for key in COMMAND_LISTS:
        for command in cfg[key]:
            shlex.split(command)  # raises on a quote left open by a cut


def test_ray_starts_with_train_state_tracking_and_token_auth():
    cfg = _prepared()
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = [c for c in cfg[key] if " start " in c]
        assert "RAY_TRAIN_ENABLE_STATE_TRACKING=1" in start, key
        assert "RAY_AUTH_MODE=token" in start, key
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def test_dashboard_port_is_not_opened_to_the_internet():
    assert "8265" not in yaml.safe_dump(_raw()["provider"])


def test_unknown_top_level_key_fails_validation():
    raw = _raw()
    raw["max_worker"] = 4  # a typo of max_workers
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_config(_prepared(raw))


def test_min_workers_above_the_cluster_limit_fails_validation():
    raw = _raw()
    (worker,) = _worker_types(raw).values()
    worker["min_workers"] = raw["max_workers"] + 1
    with pytest.raises(ValueError, match="smaller than the sum of `min_workers`"):
        validate_config(_prepared(raw))
