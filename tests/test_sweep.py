"""Sweep planning, per-run resources, run folders and the command line (no cluster needed)."""
import importlib.util
import json

import pytest

from d2r_torchrl.sweep import PRESETS, plan_sweep, run_resources
from d2r_torchrl.sweep.__main__ import parse
from d2r_torchrl.sweep.launcher import _prepare
from d2r_torchrl.sweep.plan import config_mismatch, write_record
from d2r_torchrl.training.config import ConfigError, apply_overrides, preset, validate


def test_plan_crosses_methods_benchmarks_and_seeds(tmp_path):
    runs = plan_sweep(tmp_path, ["d2r", "mt_sac"], [0, 3], ["MT10", "MT50"], ["loss.gamma=0.9"])
    assert len(runs) == 8
    assert runs[0].name == "d2r_MT10_seed0" and runs[-1].name == "mt_sac_MT50_seed3"
    d2r_mt50 = next(r for r in runs if r.name == "d2r_MT50_seed3")
    assert d2r_mt50.config.buffer.capacity == preset("d2r", "MT50").buffer.capacity  # the preset's values
    assert d2r_mt50.config.loss.gamma == 0.9 and d2r_mt50.config.seed == 3
    assert d2r_mt50.run_dir == tmp_path / "d2r_MT50_seed3" and d2r_mt50.group == "d2r_MT50"
    assert not d2r_mt50.config.log.progress_bar
    with pytest.raises(ConfigError, match="set per run"):
        plan_sweep(tmp_path, ["d2r"], [0], ["MT10"], ["seed=4"])
    with pytest.raises(ConfigError, match="Duplicate"):
        plan_sweep(tmp_path, ["d2r"], [0, 0], ["MT10"])
    with pytest.raises(ConfigError, match="Unknown algorithm"):
        plan_sweep(tmp_path, ["dqn"], [0], ["MT10"])
    with pytest.raises(ConfigError, match="must be positive"):
        plan_sweep(tmp_path, ["d2r"], [0], ["MT10"], ["collector.steps_per_task=0"])


def test_plan_accepts_a_task_list_as_benchmark(tmp_path):
    tasks = "reach-v3,window-open-v3"
    (run,) = plan_sweep(tmp_path, ["soft_modular"], [1], [tasks])
    assert run.config.env.benchmark == tasks and run.group == "soft_modular_reach-v3+window-open-v3"
    assert run.config.network.soft_modular_preset == preset("soft_modular", "MT10").network.soft_modular_preset
    with pytest.raises(ConfigError, match="set per run"):
        plan_sweep(tmp_path, ["d2r"], [0], ["MT10"], ["env.benchmark=MT50"])
    with pytest.raises(ConfigError, match="Unknown benchmark"):
        plan_sweep(tmp_path, ["d2r"], [0], ["reach-v3,open-the-fridge"])


def test_resources_follow_device_and_collector(tmp_path):
    config = preset("d2r", "MT10")
    assert run_resources(config, cluster_gpus=0) == {"num_cpus": 1, "num_gpus": 0}
    assert run_resources(config, cluster_gpus=2) == {"num_cpus": 1, "num_gpus": 1}  # device=auto
    config.device = "cpu"
    assert run_resources(config, cluster_gpus=2) == {"num_cpus": 1, "num_gpus": 0}
    config.collector.kind, config.collector.num_workers = "multi_sync", 5
    assert run_resources(config, cluster_gpus=0)["num_cpus"] == 5
    assert run_resources(config, cluster_gpus=1, cpus=2, gpus=0.5) == {"num_cpus": 2, "num_gpus": 0.5}
    config.device = "cuda:0"
    with pytest.raises(ConfigError, match="cluster has 0"):
        run_resources(config, cluster_gpus=0)


def test_run_folders_decide_skip_resume_or_refuse(tmp_path):
    [run] = plan_sweep(tmp_path, ["mt_sac"], [0], ["MT10"])
    assert _prepare(run) is None and config_mismatch(run) == []  # new run
    run.run_dir.mkdir()
    (run.run_dir / "config.json").write_text(json.dumps(run.config.to_dict()))
    assert _prepare(run) is None and not run.run_dir.exists()  # died before its first checkpoint: restart
    run.run_dir.mkdir()
    (run.run_dir / "config.json").write_text(json.dumps(run.config.to_dict()))
    budget = run.config.collector.total_steps_per_task
    write_record(run.run_dir, {"status": "done", "frames": 10 * budget})  # 10 tasks
    assert _prepare(run).status == "skipped"
    [other] = plan_sweep(tmp_path, ["mt_sac"], [0], ["MT10"], ["loss.gamma=0.5", "buffer.kind=uniform"])
    refused = _prepare(other)
    assert refused.status == "failed" and "buffer.kind, loss.gamma" in refused.error
    # keys a resumed run may change (device, compile.*) are no mismatch, nor one the saved config
    # lacks (added since), nor one that no longer exists
    saved = run.config.to_dict()
    saved["device"] = "cuda"
    del saved["buffer"]["max_priority_ratio"]
    saved["compile"]["chain_kernels"] = False
    (run.run_dir / "config.json").write_text(json.dumps(saved))
    assert config_mismatch(run) == []
    # a larger budget (a key a resumed run may change) continues a finished run
    [longer] = plan_sweep(tmp_path, [run.method], [run.seed], [run.benchmark], [f"collector.total_steps_per_task={budget + 200}"])
    assert config_mismatch(longer) == [] and _prepare(longer) is None


def test_command_line_presets_and_help(tmp_path, capsys):
    args, runs = parse(["--preset", "mt10-learning-cpu", "--seeds", "0", "1", "--out", str(tmp_path), "device=cpu"])
    assert [r.name for r in runs] == [f"{m}_MT10_seed{s}" for m in PRESETS["mt10-learning-cpu"]["methods"] for s in (0, 1)]
    assert runs[0].config.collector.total_steps_per_task == 6000 and runs[0].config.device == "cpu"
    _, runs = parse(["--methods", "mh_sac", "--out", str(tmp_path)])
    assert [r.name for r in runs] == ["mh_sac_MT10_seed0"]
    with pytest.raises(SystemExit):
        parse(["--help"])
    out = capsys.readouterr().out
    assert "--address" in out and "buffer.kind = 'stratified_prioritized'" in out


def test_ray_collector_without_ray_is_a_config_error(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "ray" else find_spec(name, *args))
    with pytest.raises(ConfigError, match=r'pip install -e "\.\[ray\]"'):
        validate(apply_overrides(preset("d2r", "MT10"), ["collector.kind=ray"]))
