"""The experiment: one command's run folders, from set-up to the last record.

- `session`: set-up and tear-down for train, retrain and replicas (checks before the first write, locks, data,
  folders, trackers);
- `check`: every check of a config that needs no data, and the config as recorded;
- `replicate`: what the units of one run folder share (config, folder, data split, durations, starting weights);
- `plan`: the pruning plan (levels; how level L's masks are made);
- `levels`: the one level loop, for one replicate or R;
- `units`: a level's trainings as jobs, trained one at a time or batched, and what each leaves behind;
- `records`: the record of a trained unit (the one place a record's fields are made);
- `progress`: the run's cost before it starts, its progress in the log, and the answer at the end;
- `folder`, `ticket`, `packed`, `tracking`: the run folder's layout, the ticket file format and its packed form, metrics
  to files and W&B;
- `callbacks`: code of the user's (or a test's) called at fixed points.

Imports branches, training, pruning, data, models, init, masks, config and core; nothing imports it but the entry
points (lottery.cli) and the launchers.
"""

from __future__ import annotations

from pathlib import Path

from lottery.experiment.callbacks import Callback, UnitInfo, register_callback


def run_experiment(cfg, run_dir, on_owned=None) -> list[dict]:
    """Run (or resume) the experiment `cfg` in `run_dir`; returns the summary records. With `replicas`, one run
    folder per replicate below `run_dir`, their units trained together. `on_owned(run_dir)` is called once every
    check has passed and the folder is this process's (lottery.experiment.session)."""
    from lottery.experiment.levels import run_levels
    from lottery.experiment.session import open_session

    with open_session(cfg, run_dir, on_owned=on_owned) as session:
        return run_levels(session.replicates, session.how, parent=session.parent)


def retrain_ticket(cfg, ticket_path, run_dir, on_owned=None) -> list[dict]:
    """Retrain a ticket in isolation (other seeds, data orders, optimizers, devices) with the same metrics."""
    from lottery import masks as M
    from lottery.core.divergence import Diverged
    from lottery.experiment.session import open_session
    from lottery.experiment.ticket import load_ticket
    from lottery.experiment.units import context, execute, finish_branch, plan_branch

    ticket = load_ticket(Path(ticket_path))
    with open_session(cfg, run_dir, ticket=ticket, on_owned=on_owned) as session:
        rep = session.replicates[0]
        folder = rep.folder
        rep.set_rewind_state(ticket.rewind_state, save=False)
        rep.steps = _with_rewind(rep.steps, ticket.rewind_step)
        if not folder.done(ticket.level, "retrain"):
            masks = M.from_bool(ticket.masks, rep.new_model())
            plan = plan_branch(rep, context(rep, ticket.level, "retrain", masks))

            def on_record(job, record):
                plan.records[0] = record

            execute([job for _, job in plan.jobs], "sequential", on_record)
            finish_branch(plan)
        record = folder.load_result(ticket.level, "retrain")
        if record.get("diverged"):
            raise Diverged([record], stopped=True)
        return folder.write_summary()


def _with_rewind(steps, rewind: int):
    from dataclasses import replace

    return replace(steps, rewind=rewind)


__all__ = ["Callback", "UnitInfo", "register_callback", "retrain_ticket", "run_experiment"]
