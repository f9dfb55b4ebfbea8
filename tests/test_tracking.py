"""Tracking: local files always, W&B when asked. The W&B checks read the offline run back from its `.wandb` file, the
same bytes `wandb sync` uploads later, so they test what would reach the server and need no network."""
import json
import struct
import time
from pathlib import Path

import pytest
import torch

from lottery.experiment import run_experiment
from lottery.experiment.tracking import wandb_mode

from conftest import stable, tiny_cfg


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


def test_offline_run_holds_level_metrics_and_resumes_same_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))  # nothing of W&B's lands in $HOME
    cfg = tiny_cfg("logger=wandb", "logger.log_every=10", "pruning.levels=3", "pruning.branches=[reinit]",
                   "logger.tags=[t1]", "name=track", "logger.log_artifacts=true")
    run_dir = tmp_path / "run"
    summary = run_experiment(cfg, run_dir)
    assert (run_dir / "metrics.jsonl").stat().st_size > 0 and (run_dir / "summary.json").exists()

    [(run_id, config, rows)] = read_offline_run(run_dir)
    assert run_id == (run_dir / "wandb_id.txt").read_text().strip()
    assert {"model", "pruning", "train", "seed"} <= config  # the resolved config went with the run

    levels = {}
    for _, row in rows:
        if "level" in row:
            levels.setdefault(row["level"], {}).update(row)
    assert sorted(levels) == [0, 1, 2]
    for rec in summary:
        got = levels[rec["level"]]
        b = rec["branch"]
        assert got[f"level/{b}/weights_remaining"] == pytest.approx(rec["weights_remaining"])
        assert got[f"level/{b}/test_accuracy"] == pytest.approx(rec["test_accuracy"])
        assert got[f"level/{b}/early_stop_step"] == rec["early_stop_step"]
        if b == "ticket":
            for layer, d in rec["layer_density"].items():
                assert got[f"level/density/{layer}"] == pytest.approx(d)
    assert levels[2]["level/ticket/weights_remaining"] < levels[1]["level/ticket/weights_remaining"] < 1

    keys = set().union(*(row for s, row in rows if s is not None))
    assert {"L0_ticket/train_loss", "L0_ticket/lr", "L2_reinit/val_loss", "L2_reinit/test_accuracy"} <= keys
    assert any(k.startswith("summary_table/") for k in keys)
    tickets = sorted(row["artifact"][1] for _, row in rows if row.get("artifact", ("",))[0] == "ticket")
    assert tickets == [f"{run_id}-ticket-level{i}" for i in range(3)]
    first_steps = [s for s, _ in rows if s is not None]
    assert first_steps == sorted(first_steps)

    # A second start in the same folder (a requeued job) continues the same W&B run, past the steps already used.
    run_experiment(cfg, run_dir)
    pieces = read_offline_run(run_dir)
    assert len(pieces) == 2 and pieces[1][0] == run_id
    assert min(s for s, _ in pieces[1][2] if s is not None) > max(first_steps)


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
                "finish": "W&B failed to finish the run (CommError: upload rejected)"}[where]
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


def test_offline_run_without_validation_split_logs_instability(tmp_path, monkeypatch):
    """dataset.val_size=0 (the LMC experiments): no validation metrics or early-stop step reach W&B (nothing logged
    as null or 0), and the lmc branch's instability is a level metric."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
    cfg = tiny_cfg("logger=wandb", "dataset.val_size=0", "pruning.levels=2", "pruning.branches=[lmc]",
                   "branch.lmc.points=3", "branch.lmc.steps=[0,10]", "train.duration=30it")
    summary = run_experiment(cfg, tmp_path / "run")
    assert all(r["early_stop_step"] is None and r["val_loss"] is None for r in summary)
    [(_, _, rows)] = read_offline_run(tmp_path / "run")
    keys = set().union(*(row for s, row in rows if s is not None))
    assert not any("val_" in k or "early_stop" in k for k in keys if not k.startswith("summary_table"))
    levels = {}
    for _, row in rows:
        if "level" in row:
            levels.setdefault(row["level"], {}).update(row)
    for rec in (r for r in summary if r["branch"] == "lmc"):
        got = levels[rec["level"]]
        assert got["level/lmc/instability_test"] == pytest.approx(rec["instability_test"])
        assert got["level/lmc/instability_train_k10"] == pytest.approx(rec["instability_by_step"]["10"]["train"])
