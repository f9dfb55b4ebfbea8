"""Results do not change under refactoring: short fixed runs on real MNIST must give exactly the `summary.json`
records that were recorded before (tests/data/regression_*.json): two single runs (recorded before the
extension-points redesign), a replicas run in each batched layout, an lmc run and a pruning-at-init run (recorded
before the one-engine change, issue 19), and SET and RigL runs (recorded before they became mask updaters, issue 27).
Where each file was made: `PINNED_ON` (the records' device_info says it too).

Regenerate the files (only when a change of results is intended, and say so in the commit) with
`LOTTERY_REGENERATE=1 python -m pytest tests/test_regression.py`. CPU kernels differ between processor models, so a
new machine may need them regenerated too.
"""
import json
import os

import pytest

from lottery.experiment import run_experiment

from conftest import DATA, REPO, make_cfg, needs_data

COMMON = ["model=lenet_300_100", "dataset=mnist", f"dataset.root={DATA}", "train.duration=300it",
          "train.eval_every=100it", "device=cpu", "threads=1", "train.progress=false", "seed=0"]
SHORT = [*COMMON, "train.duration=200it"]
DST = ["experiment=pai_lenet_mnist", "method=random", "pruning.scope=erk", "pruning.levels=2", "pruning.rate=0.6",
       "pruning.branches=[]", "train.duration=200it", "train.eval_every=100it", "dst.delta_t=50"]
REPLICAS = ["pruning=lth", "pruning.levels=3", "pruning.branches=[reinit,random_prune]", "replicas=2"]
RUNS = {
    "layerwise": [*COMMON, "pruning=lth", "pruning.levels=3", "pruning.branches=[reinit,random_prune,shuffle]"],
    "global": [*COMMON, "pruning=global", "pruning.levels=3", "pruning.rate=0.5", "pruning.exclude=[]",
               "pruning.branches=[random_prune]"],
    "replicas_stacked": [*SHORT, *REPLICAS, "replica_batching=stacked"],
    "replicas_interleaved": [*SHORT, *REPLICAS, "replica_batching=interleaved"],
    "lmc": [*SHORT, "pruning=lth", "pruning.levels=2", "pruning.branches=[lmc,reinit]", "branch.lmc.steps=[0,50]",
            "branch.lmc.points=5", "branch.lmc.train_examples=2000"],
    "pai_snip": [*SHORT, "experiment=pai_lenet_mnist", "method=snip", "pruning.levels=3", "pruning.rate=0.6",
                 "train.duration=200it", "train.eval_every=100it", "pruning.branches=[invert,layer_shuffle]"],
    # dynamic sparse training (recorded before SET and RigL became mask updaters, issue 27): a single run and, for
    # RigL, replicas in each batched layout; mask updates every 50 steps so a 200-step unit sees three of them
    "set": [*SHORT, *DST, "dst=set"],
    "rigl": [*SHORT, *DST, "dst=rigl"],
    "rigl_replicas_stacked": [*SHORT, *DST, "dst=rigl", "replicas=2", "replica_batching=stacked"],
    "set_replicas_interleaved": [*SHORT, *DST, "dst=set", "replicas=2", "replica_batching=interleaved"],
}
# The machine and CPU kernels each reference was made with: the others on an Intel Xeon (default kernels), the
# dynamic sparse ones on the 2-core AMD EPYC under ATEN_CPU_CAPABILITY=avx2 (which reproduces the Xeon's digits for
# the older references there), torch 2.14.1 CPU.
PINNED_ON = {name: "Intel Xeon" for name in RUNS}
PINNED_ON.update(dict.fromkeys(("set", "rigl", "rigl_replicas_stacked", "set_replicas_interleaved"),
                               "AMD EPYC, ATEN_CPU_CAPABILITY=avx2"))
# Keys that name where or when a run happened, not what it computed.
_VOLATILE = ("run_dir", "wall_time_s", "provenance")  # the last two: in records made after the first references


def _clean(records):
    return [{k: v for k, v in r.items() if k not in _VOLATILE} for r in records]


def _summaries(run_dir):
    """summary.json of a run, or of each replicate folder of a replicas run (in seed order)."""
    if (run_dir / "summary.json").exists():
        return _clean(json.loads((run_dir / "summary.json").read_text()))
    return {p.parent.name: _clean(json.loads(p.read_text())) for p in sorted(run_dir.glob("replicate_*/summary.json"))}


def _recorded(got, expected):
    """`got` restricted to the keys `expected` has, at every depth (device_info gained `threads`)."""
    if isinstance(expected, dict) and isinstance(got, dict):
        return {k: _recorded(got.get(k, "<missing>"), v) for k, v in expected.items()}
    return got


def _compare(got, expected, where=""):
    assert len(got) == len(expected), where
    for g, e in zip(got, expected):
        # Every recorded key keeps its exact value; later issues may add keys (a record only grows).
        assert _recorded(g, e) == e, (where, g["level"], g["branch"])


@needs_data("MNIST", "raw")
@pytest.mark.parametrize("name", sorted(RUNS))
def test_summary_unchanged(name, tmp_path):
    path = REPO / "tests" / "data" / f"regression_{name}.json"
    run_experiment(make_cfg(*RUNS[name]), tmp_path / name)
    got = _summaries(tmp_path / name)
    if os.environ.get("LOTTERY_REGENERATE") or (os.environ.get("LOTTERY_REGENERATE_NEW") and not path.exists()):
        path.write_text(json.dumps(got, indent=1) + "\n")
    expected = json.loads(path.read_text())
    if isinstance(expected, dict):
        assert sorted(got) == sorted(expected)
        for folder in expected:
            _compare(got[folder], expected[folder], folder)
    else:
        _compare(got, expected)
