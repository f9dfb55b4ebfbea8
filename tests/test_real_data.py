"""Real MNIST and CIFAR-10 from $LOTTERY_DATA (default ../shared/data): the paper's settings give the paper's kind of results on this CPU."""
import json

import pytest

from lottery.experiment import run_experiment

from conftest import DATA, make_cfg, needs_data, run_cli


@pytest.mark.slow
@needs_data("MNIST", "raw")
def test_lenet_dense_three_epochs_reaches_97_percent(tmp_path):
    """The plain-training command of docs/getting-started.md: LeNet-300-100, Adam 1.2e-3, batch 60, 3 epochs, pruning off."""
    run = tmp_path / "dense"
    out = run_cli("model=lenet_300_100", "dataset=mnist", f"dataset.root={DATA}", "pruning=none", "optimizer=adam",
                  "optimizer.lr=1.2e-3", "train.batch_size=60", "train.duration=3ep", f"hydra.run.dir={run}",
                  cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    (record,) = json.loads((run / "summary.json").read_text())
    assert record["steps"] == 3 * (55000 // 60)
    # At the early-stop step (the best validation loss, so chosen without the test set): the last evaluations swing
    # between 96.7% and 97.5% from one evaluation to the next on some processors, a threshold on one of them is noise.
    assert record["early_stop_test_accuracy"] >= 0.970, record
    assert record["test_accuracy"] >= 0.960, record


@pytest.mark.slow
@needs_data("cifar-10-batches-py")
def test_conv2_trains_on_real_cifar10_and_loss_falls(tmp_path):
    # one thread, as every test's runs (two threads took 43 s of wall time but kept the other worker's core too)
    cfg = make_cfg("model=conv2", "dataset=cifar10", f"dataset.root={DATA}", "dataset.verify=false",
                   "dataset.val_size=1000", "pruning=none", "optimizer.lr=2e-4", "train.duration=100it",
                   "train.eval_every=100it", "train.progress=false", "threads=1")
    (record,) = run_experiment(cfg, tmp_path / "conv2")
    result = json.loads((tmp_path / "conv2" / "levels" / "level_0" / "ticket" / "result.json").read_text())
    losses = [e["val_loss"] for e in result["evals"]]
    assert losses[-1] < losses[0] - 0.15, losses
    assert result["evals"][-1]["train_loss"] < losses[0] - 0.15  # mean training loss over the run vs. loss at step 0
    assert record["test_accuracy"] > 0.25


@pytest.mark.slow
@needs_data("MNIST", "raw")
def test_winning_ticket_effect_lenet_mnist(tmp_path):
    """Scaled-down lth_lenet_mnist (1,500 steps per level, 60% of the hidden weights and 30% of the output weights
    pruned per level, 3 levels: down to 16.1%, the headline range): the ticket is no less accurate than the dense
    network (0.1 points of noise allowed), and randomly reinitializing it costs at least 0.3 points. Accuracy is the
    test accuracy at the end of training; the early-stop accuracy is printed beside it. Measured (2026-11-29, two
    threads) over seeds 0-3: the ticket led the dense network by 0.9-1.3 points and its reinit control by 1.0-1.4."""
    cfg = make_cfg("experiment=lth_lenet_mnist", f"dataset.root={DATA}", "train.duration=1500it",
                   "pruning.levels=3", "pruning.rates.linear=0.6", "pruning.rates.output=0.3",
                   "pruning.branches=[reinit]", "train.progress=false")
    summary = run_experiment(cfg, tmp_path / "lth")
    s = {(r["level"], r["branch"]): r for r in summary}
    dense, ticket, reinit = s[(0, "ticket")], s[(2, "ticket")], s[(2, "reinit")]
    assert round(100 * ticket["weights_remaining"], 1) == 16.1
    print(json.dumps({k: (v["weights_remaining"], v["early_stop_test_accuracy"], v["test_accuracy"])
                      for k, v in [("dense", dense), ("ticket", ticket), ("reinit", reinit)]}))
    assert ticket["test_accuracy"] >= dense["test_accuracy"] - 0.001
    assert reinit["test_accuracy"] <= ticket["test_accuracy"] - 0.003
