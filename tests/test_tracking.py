"""Tracking: local files always, W&B when asked. The W&B checks read the offline run back from its `.wandb` file, the
same bytes `wandb sync` uploads later, so they test what would reach the server and need no network."""
import json
import re
import struct
import time
from pathlib import Path

import pytest
import torch

from lottery.experiment import run_experiment
from lottery.experiment.tracking import wandb_mode

from conftest import TINY, fault, run_cli, stable, tiny_cfg


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: on a busy 2-core machine threads only spin against each other
    yield
    torch.set_num_threads(threads)


def wandb_records(path: Path):
    """Decoded records of a `.wandb` file: W&B's header, then LevelDB-log framing (32 KiB blocks, 7-byte headers)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", "not a W&B transaction log"
    pos, parts = 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0:  # zero padding up to the block end (writer flushed a partial block)
            pos += left - 7
            continue
        chunk, pos = data[pos:pos + length], pos + length
        parts = chunk if kind in (1, 2) else parts + chunk  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(parts)
            yield record


def finished_records(path: Path, timeout: float = 60.0) -> list:
    """All records once the file ends with the run's exit record: W&B's service may still be writing the last blocks
    when `run.finish()` returns."""
    deadline = time.monotonic() + timeout
    while True:
        records = list(wandb_records(path))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def read_offline_run(run_dir: Path):
    """(run id, config keys, history rows with their W&B step) of every offline piece of the run, oldest first."""
    pieces = []
    for f in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        run_id, config, rows = None, set(), []
        for r in finished_records(f):
            kind = r.WhichOneof("record_type")
            if kind == "artifact":
                rows.append((None, {"artifact": (r.artifact.type, r.artifact.name)}))
            elif kind == "run":
                run_id = r.run.run_id
                config = {item.key or item.nested_key[0] for item in r.run.config.update}
            elif kind == "history":
                row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
                rows.append((r.history.step.num, row))
        pieces.append((run_id, config, rows))
    return pieces


def offline_runs(run_dir: Path) -> dict[str, dict]:
    """Every W&B run of a run folder, by id, from its offline files (a run started twice has two pieces): job_type,
    group, tags, config values, history rows (W&B step, row), the last value of each summary key, and its folders."""
    runs: dict[str, dict] = {}
    for f in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        run = None
        for r in finished_records(f, timeout=10):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                run = runs.setdefault(r.run.run_id, {"config": {}, "rows": [], "summary": {}, "tags": set(),
                                                      "dirs": []})
                if f.parent not in run["dirs"]:
                    run["dirs"].append(f.parent)
                run.update(job_type=r.run.job_type, group=r.run.run_group)
                run["tags"] |= set(r.run.tags)
                for item in r.run.config.update:
                    run["config"][item.key or item.nested_key[0]] = json.loads(item.value_json)
            elif kind == "history":
                row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
                run["rows"].append((r.history.step.num, row))
            elif kind == "summary":
                for i in r.summary.update:
                    run["summary"][i.key or "/".join(i.nested_key)] = json.loads(i.value_json)
    return runs


def metric_keys(rows) -> set[str]:
    return {k for _, row in rows for k in row if not k.startswith("_")}


def test_wandb_mode_follows_env_then_credentials(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    netrc = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"
    monkeypatch.delenv("WANDB_MODE")
    assert wandb_mode() == "offline"  # no credentials anywhere
    netrc.write_text("machine api.wandb.ai\n  login user\n  password x\n")
    assert wandb_mode() == "online"
    netrc.write_text("machine example.org\n  login user\n  password x\n")
    assert wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert wandb_mode() == "online"


@pytest.mark.slow
def test_offline_runs_one_per_unit_with_shared_keys_and_the_records_table(tmp_path, monkeypatch):
    """W&B's conventions: every unit its own run with the same metric keys against its training step, level, branch
    and replicate in its config, its record as its summary; the job's run holds the records table. A second start
    in the same folder (a requeued job) continues the same runs."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))  # nothing of W&B's lands in $HOME
    cfg = tiny_cfg("logger=wandb", "logger.log_every=10", "pruning.levels=3", "pruning.branches=[reinit]",
                   "logger.tags=[t1]", "name=track", "logger.log_artifacts=true")
    run_dir = tmp_path / "run"
    summary = run_experiment(cfg, run_dir)
    assert (run_dir / "metrics.jsonl").stat().st_size > 0 and (run_dir / "summary.json").exists()

    runs = offline_runs(run_dir)
    job_id = (run_dir / "wandb_id.txt").read_text().strip()
    job = runs.pop(job_id)
    assert job["job_type"] == "results" and job["group"] == "track" and "t1" in job["tags"]
    assert {"model", "pruning", "train", "seed"} <= set(job["config"])  # the resolved config went with the run
    assert sorted(runs) == sorted(f"{job_id}-L{r['level']}-{r['branch']}" for r in summary)  # one run per unit

    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for rec in summary:
        run = runs[f"{job_id}-L{rec['level']}-{rec['branch']}"]
        assert run["job_type"] == "unit" and run["group"] == "track" and "t1" in run["tags"]
        assert run["config"]["unit"] == {"level": rec["level"], "branch": rec["branch"], "name": "", "replicate": 0,
                                         "folder": str(run_dir)}
        assert run["config"]["model"] == job["config"]["model"]  # filter and group units by any setting
        # the same keys in every unit, against the unit's own training step
        assert metric_keys(run["rows"]) == {"train/loss", "train/lr", "eval/train_loss", "eval/val_loss",
                                            "eval/val_accuracy", "eval/test_loss", "eval/test_accuracy", "eval/lr"}
        unit_evals = [e for e in evals if e["kind"] == "eval" and (e["level"], e["branch"]) == (rec["level"],
                                                                                               rec["branch"])]
        logged = {step: row for step, row in run["rows"] if "eval/test_accuracy" in row}
        assert sorted(logged) == [e["step"] for e in unit_evals] == [0, 20, 40, 60]
        for e in unit_evals:
            assert logged[e["step"]]["eval/val_loss"] == pytest.approx(e["val_loss"])
        assert sorted(s for s, row in run["rows"] if "train/loss" in row) == [10, 20, 30, 40, 50, 60]
        # its record as its summary
        got = run["summary"]
        assert got["test_accuracy"] == pytest.approx(rec["test_accuracy"])
        assert got["weights_remaining"] == pytest.approx(rec["weights_remaining"])
        assert got["early_stop_step"] == rec["early_stop_step"] and got["diverged"] is False
        for layer, d in rec["layer_density"].items():
            assert got[f"layer_density/{layer}"] == pytest.approx(d)
    keys = set().union(*(metric_keys(r["rows"]) for r in [job, *runs.values()]))
    assert not [k for k in keys if re.match(r"L\d+_", k)]  # no key per level and branch

    # the records table: summary.json's rows, in the job's run
    [path] = [row["records/path"] for _, row in job["rows"] if row.get("records/_type") == "table-file"]
    table = json.loads((job["dirs"][0] / "files" / path).read_text())
    rows = [dict(zip(table["columns"], values)) for values in table["data"]]
    assert [(r["level"], r["branch"]) for r in rows] == [(r["level"], r["branch"]) for r in summary]
    assert [r["test_accuracy"] for r in rows] == pytest.approx([r["test_accuracy"] for r in summary])
    assert json.loads(rows[-1]["layer_density"]) == pytest.approx(summary[-1]["layer_density"])
    tickets = sorted(row["artifact"][1] for row in read_rows(run_dir) if row.get("artifact", ("",))[0] == "ticket")
    assert tickets == [f"{job_id}-ticket-level{i}" for i in range(3)]
    first_steps = [s for s, _ in job["rows"]]
    assert first_steps == sorted(first_steps)

    # A second start in the same folder (a requeued job) continues the same W&B run, past the steps already used.
    run_experiment(cfg, run_dir)
    again = offline_runs(run_dir)[job_id]
    assert len(again["dirs"]) == 2
    assert min(s for s, _ in again["rows"][len(job["rows"]):]) > max(first_steps)


def read_rows(run_dir: Path) -> list[dict]:
    """Every history row and artifact of every offline piece of the run folder (artifacts as {"artifact": (type,
    name)})."""
    return [row for _, _, rows in read_offline_run(run_dir) for _, row in rows]


@pytest.mark.slow
def test_a_resumed_unit_continues_its_own_run(tmp_path):
    """SIGUSR2 inside level 1's ticket: the job checkpoints and exits 75; the rerun resumes the unit and its W&B run
    (the same id, a second piece), whose rows then reach the end of training."""
    args, env = fault(signal_at=30, level=1, branch="ticket")
    run_dir = tmp_path / "run"
    cmd = [*TINY, "logger=wandb", "logger.log_every=10", "pruning.levels=2", "pruning.branches=[]", *args,
           f"hydra.run.dir={run_dir}"]
    assert run_cli(*cmd, cwd=tmp_path, env=env).returncode == 75
    r = run_cli(*cmd, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    job_id = (run_dir / "wandb_id.txt").read_text().strip()
    runs = offline_runs(run_dir)
    unit = runs[f"{job_id}-L1-ticket"]
    assert len(unit["dirs"]) == 2  # two starts of one W&B run
    assert {s for s, row in unit["rows"] if "eval/test_accuracy" in row} == {0, 20, 40, 60}
    assert unit["summary"]["test_accuracy"] == json.loads((run_dir / "summary.json").read_text())[1]["test_accuracy"]
    assert len(runs[f"{job_id}-L0-ticket"]["dirs"]) == 1  # a finished unit is not reopened
    # the figures of the finished run, as images in the job's run (drawn by the entry point, lottery-report's)
    images = {k.removesuffix("/_type"): row[k.replace("/_type", "/path")] for _, row in runs[job_id]["rows"]
              for k, v in row.items() if k.endswith("/_type") and v == "image-file"}
    assert {"figures/lottery_ticket", "figures/layer_density"} <= set(images), images
    files = [d / "files" / images["figures/lottery_ticket"] for d in runs[job_id]["dirs"]]
    assert any(f.exists() and f.stat().st_size > 1000 for f in files), files


def test_replicas_open_their_runs_side_by_side(tmp_path):
    """replicas=2: one job run per replicate folder and one run per unit, several open at once in one process."""
    cfg = tiny_cfg("logger=wandb", "replicas=2", "pruning.levels=2", "pruning.branches=[reinit]",
                   "train.duration=40it")
    run_experiment(cfg, tmp_path / "run")
    for seed in (0, 1):
        folder = tmp_path / "run" / f"replicate_{seed}"
        job_id = (folder / "wandb_id.txt").read_text().strip()
        runs = offline_runs(folder)
        assert sorted(runs) == sorted([job_id, f"{job_id}-L0-ticket", f"{job_id}-L1-ticket", f"{job_id}-L1-reinit"])
        summary = json.loads((folder / "summary.json").read_text())
        for rec in summary:
            run = runs[f"{job_id}-L{rec['level']}-{rec['branch']}"]
            assert run["config"]["unit"]["replicate"] == seed == run["config"]["seed"]
            assert run["summary"]["test_accuracy"] == pytest.approx(rec["test_accuracy"])
            assert "eval/test_accuracy" in metric_keys(run["rows"])


@pytest.mark.parametrize("how", ["logger=none", "disabled"])
def test_no_wandb_files_unless_asked(tmp_path, monkeypatch, how):
    if how == "disabled":
        monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = tiny_cfg("pruning.levels=1", "train.duration=20it", "logger=wandb" if how == "disabled" else how)
    run_experiment(cfg, tmp_path / "run")
    assert (tmp_path / "run" / "summary.json").exists() and (tmp_path / "run" / "metrics.jsonl").exists()
    assert not list((tmp_path / "run").glob("wandb/*run-*"))


# --- W&B failures never cost the run ----------------------------------------------------------------------------

def _wandb_failures(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(("W&B failed", "W&B could not"))]


def _assert_run_complete(run_dir: Path, summary: list[dict]) -> None:
    assert [(r["level"], r["branch"]) for r in summary] == [(0, "ticket"), (1, "ticket")]
    assert stable(json.loads((run_dir / "summary.json").read_text())) == stable(summary)
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {(e["level"], e["step"]) for e in evals if e["kind"] == "eval"} == \
        {(lv, s) for lv in (0, 1) for s in (0, 20, 40)}


@pytest.mark.parametrize("where", ["init", "log", "finish"])
def test_wandb_failure_is_logged_once_and_training_goes_on(tmp_path, monkeypatch, caplog, where):
    """The service rejects the run at start, a write fails mid-run (ENOSPC), or finishing fails."""
    import errno

    import wandb

    real_init = wandb.init

    def init(*args, **kwargs):
        if where == "init":
            raise wandb.errors.CommError("run rejected: 403 permission denied for entity 'lab'")
        run = real_init(*args, **kwargs)
        if where == "log":
            real_log, calls = run.log, []

            def log(*a, **k):
                calls.append(1)
                if len(calls) > 3:
                    raise OSError(errno.ENOSPC, "No space left on device")
                return real_log(*a, **k)
            monkeypatch.setattr(run, "log", log)
        if where == "finish":
            real_finish = run.finish

            def finish(*a, **k):
                if k.get("exit_code") == 0:
                    real_finish(*a, **k)
                    raise wandb.errors.CommError("upload rejected")
                return real_finish(*a, **k)
            monkeypatch.setattr(run, "finish", finish)
        return run

    monkeypatch.setattr(wandb, "init", init)
    run_dir = tmp_path / "run"
    cfg = tiny_cfg("logger=wandb", "logger.log_every=10", "pruning.levels=2", "pruning.branches=[]",
                   "train.duration=40it")
    with caplog.at_level("INFO"):
        summary = run_experiment(cfg, run_dir)
    _assert_run_complete(run_dir, summary)
    [message] = _wandb_failures(caplog)
    expected = {"init": "W&B failed to start (CommError: run rejected: 403",
                "log": "W&B failed to log metrics (OSError: [Errno 28] No space left on device)",
                "finish": "W&B failed to finish a unit's run (CommError: upload rejected)"}[where]
    assert message.startswith(expected), message
    assert "training goes on" in message and str(run_dir) in message


def test_wandb_cannot_create_its_folder(tmp_path, caplog):
    """A real W&B failure: its folder cannot be created (here a file is in the way)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "wandb").write_text("not a folder")
    cfg = tiny_cfg("logger=wandb", "pruning.levels=2", "pruning.branches=[]", "train.duration=40it")
    with caplog.at_level("INFO"):
        summary = run_experiment(cfg, run_dir)
    _assert_run_complete(run_dir, summary)
    [message] = _wandb_failures(caplog)
    assert message.startswith("W&B failed to start (NotADirectoryError"), message


def test_full_disk_under_wandb_folder_is_reported(tmp_path, caplog):
    """W&B's service drops records silently when its folder's disk is full: the run finishes and says so once."""
    import subprocess
    run_dir = tmp_path / "run"
    (run_dir / "wandb").mkdir(parents=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(run_dir / "wandb")],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root and mount rights): {r.stderr.strip()}")
    try:
        cfg = tiny_cfg("logger=wandb", "logger.log_every=1", "pruning.levels=2", "pruning.branches=[]",
                       "train.duration=40it")
        with caplog.at_level("INFO"):
            summary = run_experiment(cfg, run_dir)
    finally:
        subprocess.run(["umount", "-l", str(run_dir / "wandb")], capture_output=True)
    _assert_run_complete(run_dir, summary)
    [message] = _wandb_failures(caplog)
    # W&B either raises from a write of its own (the summary table) or only notes the dropped records in its log
    assert message.startswith(("W&B could not write its files", "W&B failed to")), message
    assert "no space left" in message.lower(), message


@pytest.mark.slow
def test_offline_run_without_validation_split_logs_instability(tmp_path, monkeypatch):
    """dataset.val_size=0 (the LMC experiments): no validation metrics or early-stop step reach W&B (nothing logged
    as null or 0); the lmc copies are runs of their own, and the branch's record (the instability) is the summary of
    the run `<job>-L<level>-lmc`."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
    cfg = tiny_cfg("logger=wandb", "dataset.val_size=0", "pruning.levels=2", "pruning.branches=[lmc]",
                   "branch.lmc.points=3", "branch.lmc.steps=[0,10]", "train.duration=30it")
    summary = run_experiment(cfg, tmp_path / "run")
    assert all(r["early_stop_step"] is None and r["val_loss"] is None for r in summary)
    runs = offline_runs(tmp_path / "run")
    job_id = (tmp_path / "run" / "wandb_id.txt").read_text().strip()
    keys = set().union(*(metric_keys(r["rows"]) for r in runs.values()))
    assert not any("val_" in k or "early_stop" in k for k in keys if not k.startswith("records"))
    for rec in (r for r in summary if r["branch"] == "lmc"):
        level = rec["level"]
        got = runs[f"{job_id}-L{level}-lmc"]["summary"]
        assert got["instability_test"] == pytest.approx(rec["instability_test"])
        assert got["instability_by_step/10/train"] == pytest.approx(rec["instability_by_step"]["10"]["train"])
        for copy in ("k0_a", "k0_b", "k10_a", "k10_b"):
            run = runs[f"{job_id}-L{level}-lmc-{copy}"]
            assert run["config"]["unit"] == {"level": level, "branch": "lmc", "name": copy, "replicate": 0,
                                             "folder": str(tmp_path / "run")}
            assert "eval/test_accuracy" in metric_keys(run["rows"])
