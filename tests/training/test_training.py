"""Trainer: a step learns, checkpoints are complete and atomic, and `openseg train` resumes the same run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_openseg.cli import main
from napari_openseg.errors import OpenSegError
from napari_openseg.training.incontext.episodes import (
    EpisodeConfig,
    draw_support_size,
    hard_dice,
    soft_dice_loss,
    training_batch,
    validation_episodes,
)
from napari_openseg.training.incontext.synth import SynthConfig
from napari_openseg.training.incontext.trainer import (
    CHECKPOINT,
    TrainConfig,
    learning_rate,
    read_checkpoint_config,
    train,
)

TINY = [
    "--widths",
    "8",
    "8",
    "8",
    "--grid",
    "32",
    "--batch-size",
    "2",
    "--support-min",
    "1",
    "--support-max",
    "3",
    "--support-sampling",
    "log-uniform",
    "--real-fraction",
    "0",
    "--val-every",
    "3",
    "--checkpoint-every",
    "1",
    "--log-every",
    "1",
    "--device",
    "cpu",
    "--lr",
    "0.003",
]


def tiny_config(**changes) -> TrainConfig:
    episodes = EpisodeConfig(batch_size=2, support_min=1, support_max=3, real_fraction=0.0)
    base = dict(
        steps=4,
        widths=(8, 8, 8),
        grid=32,
        lr=3e-3,
        warmup=2,
        episodes=episodes,
        real_families=(),
        val_every=3,
        val_synthetic=4,
        checkpoint_every=1,
        log_every=1,
    )
    base.update(changes)
    return TrainConfig(**base)


def losses(run_dir) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def test_batches_depend_only_on_seed_and_step():
    config = EpisodeConfig(batch_size=3, support_min=2, support_max=5, real_fraction=0.0)
    a = training_batch(7, 1, config, None)
    b = training_batch(7, 1, config, None)
    c = training_batch(8, 1, config, None)
    assert torch.equal(a.support_images, b.support_images) and torch.equal(a.query_masks, b.query_masks)
    assert a.query.shape == (3, 1, 64, 64) and a.support_images.shape[0] == 3
    assert 2 <= a.support_images.shape[1] <= 5
    assert not torch.equal(a.query, c.query)
    assert float(a.query.min()) >= 0 and float(a.query.max()) <= 1
    assert set(torch.unique(a.support_masks).tolist()) <= {0.0, 1.0}


def test_log_uniform_support_sizes_give_every_doubling_the_same_share():
    config = EpisodeConfig(support_min=1, support_max=63, support_sampling="log-uniform")
    rng = np.random.default_rng(0)
    sizes = np.array([draw_support_size(rng, config) for _ in range(20000)])
    assert sizes.min() == 1 and sizes.max() == 63
    # [1, 2), [2, 4), ..., [32, 64): six doublings, one sixth of the draws each.
    shares = np.histogram(sizes, bins=[1, 2, 4, 8, 16, 32, 64])[0] / len(sizes)
    assert np.allclose(shares, 1 / 6, atol=0.015)
    uniform = EpisodeConfig(support_min=1, support_max=63)
    assert abs(np.mean([draw_support_size(rng, uniform) for _ in range(20000)]) - 32) < 0.5
    with pytest.raises(ValueError, match="support_sampling"):
        draw_support_size(rng, EpisodeConfig(support_sampling="normal"))


def test_soft_dice_loss_and_hard_dice_values():
    target = torch.zeros(2, 1, 4, 4)
    target[:, :, :2] = 1
    perfect = torch.where(target > 0, 20.0, -20.0)
    assert float(soft_dice_loss(perfect, target)) == pytest.approx(0.0, abs=1e-6)
    assert float(soft_dice_loss(-perfect, target)) > 0.9
    half = torch.zeros(1, 1, 4, 4)
    half[:, :, :1] = 1
    assert hard_dice(half, target[:1]).tolist() == pytest.approx([2 * 4 / (4 + 8)])
    assert hard_dice(torch.zeros(1, 4), torch.zeros(1, 4)).tolist() == [1.0]


def test_learning_rate_schedule():
    config = TrainConfig(steps=100, lr=1e-3, warmup=10, decay_start=50)
    assert learning_rate(config, 0) == pytest.approx(1e-4)
    assert learning_rate(config, 30) == pytest.approx(1e-3)
    assert learning_rate(config, 75) == pytest.approx(0.5e-3)
    assert learning_rate(config, 100) == pytest.approx(0.0, abs=1e-12)


def test_training_lowers_the_loss_on_a_fixed_batch():
    """A few Adam steps on one batch must fit it better: the loss and its gradient are wired right."""
    from napari_openseg.model.fast import fast_forward
    from napari_openseg.model.universeg import build_network

    torch.manual_seed(0)
    net = build_network((8, 8, 8), grid_size=32)
    batch = validation_episodes(None, 3, 0, 4, synth=SynthConfig(size=32))["synthetic"]
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    first = None
    for _ in range(25):
        loss = soft_dice_loss(
            fast_forward(net, batch.query, batch.support_images, batch.support_masks), batch.query_masks
        )
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < first - 0.05


def test_run_folder_contents(tmp_path):
    record = train(tiny_config(), tmp_path / "run", device="cpu")
    assert record["step"] == 4
    state = torch.load(tmp_path / "run" / CHECKPOINT, weights_only=True)
    assert state["step"] == 4 and set(state["optimizer"]["state"])  # Adam moments are stored
    assert isinstance(state["torch_rng"], torch.Tensor)
    assert read_checkpoint_config(tmp_path / "run").widths == (8, 8, 8)
    from napari_openseg.model.registry import network_from_file

    net = network_from_file(tmp_path / "run" / "weights.pt")
    assert net.config.grid_size == 32 and net.weights_info["step"] == 4
    assert torch.equal(net.state_dict()["out_conv.conv.weight"], state["model"]["out_conv.conv.weight"])
    assert (tmp_path / "run" / "best.pt").is_file()
    vals = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [v["step"] for v in vals if "val" in v] == [3, 4]
    assert 0.0 <= vals[-1]["val"]["synthetic"] <= 1.0
    assert not list((tmp_path / "run").glob("*.tmp*"))
    with pytest.raises(OpenSegError, match="--resume"):
        train(tiny_config(), tmp_path / "run", device="cpu")


def test_cli_train_resumes_the_same_run(tmp_path, capsys):
    """Interrupted after 2 of 5 steps and resumed, a run must end where the uninterrupted run ends:
    identical step count, weights, Adam state and per-step losses (same seed, same batches)."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main(["train", str(whole), "--steps", "5", *TINY]) == 0
    assert main(["train", str(parts), "--steps", "5", "--stop-after", "2", *TINY]) == 0
    assert torch.load(parts / CHECKPOINT, weights_only=True)["step"] == 2
    assert main(["train", str(parts), "--resume", *TINY]) == 0  # the stored length (5) is kept
    assert read_checkpoint_config(parts).episodes.support_sampling == "log-uniform"
    out = capsys.readouterr().out
    assert "validation Dice" in out and "step       5" in out

    a = torch.load(whole / CHECKPOINT, weights_only=True)
    b = torch.load(parts / CHECKPOINT, weights_only=True)
    assert a["step"] == b["step"] == 5
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for index, moments in a["optimizer"]["state"].items():
        for name, value in moments.items():
            assert torch.equal(value, b["optimizer"]["state"][index][name]), (index, name)
    assert losses(whole) == losses(parts) and len(losses(whole)) == 5
    assert np.isfinite(losses(whole)).all()


def test_batches_built_in_worker_processes_give_the_same_run(tmp_path):
    """Workers only move batch building elsewhere: losses and weights equal the serial run's."""
    serial = train(tiny_config(steps=3), tmp_path / "serial", device="cpu")
    pooled = train(tiny_config(steps=3), tmp_path / "pooled", device="cpu", workers=2)
    assert serial["step"] == pooled["step"] == 3
    assert losses(tmp_path / "serial") == losses(tmp_path / "pooled")
    a = torch.load(tmp_path / "serial" / CHECKPOINT, weights_only=True)["model"]
    b = torch.load(tmp_path / "pooled" / CHECKPOINT, weights_only=True)["model"]
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_resume_without_checkpoint_says_what_to_do(tmp_path, capsys):
    assert main(["train", str(tmp_path / "none"), "--resume", *TINY]) == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_fine_tuning_starts_from_the_given_weights_at_a_new_grid(tmp_path, tiny_weights):
    from napari_openseg.model.registry import network_from_file

    config = tiny_config(steps=1, grid=64, lr=0.0, widths=(4, 4), init_weights=str(tiny_weights))
    train(config, tmp_path / "fine", device="cpu")
    tuned = network_from_file(tmp_path / "fine" / "weights.pt")
    source = network_from_file(tiny_weights)
    assert tuned.config.grid_size == 64 and tuned.config.encoder_channels == source.config.encoder_channels
    for key, value in source.state_dict().items():
        assert torch.equal(value, tuned.state_dict()[key]), key  # lr 0: the step changed nothing


def test_stopping_a_run_keeps_a_checkpoint_of_the_last_step(tmp_path):
    """Closing the generator (Cancel, Ctrl-C, `kill`) saves the steps done since the last checkpoint."""
    from napari_openseg.training.incontext.trainer import iter_train

    run = iter_train(
        tiny_config(steps=50, checkpoint_every=100, val_every=100), tmp_path / "run", device="cpu"
    )
    steps = [next(run).done for _ in range(4)]  # the first record is the start (step 0)
    run.close()
    assert steps == [0, 1, 2, 3]
    assert torch.load(tmp_path / "run" / CHECKPOINT, weights_only=True)["step"] == 3


def test_a_fine_tuning_run_resumes_without_its_source_weights_and_keeps_their_decoder(tmp_path):
    from napari_openseg.model.registry import network_from_file, save_weights
    from napari_openseg.model.universeg import UniverSeg, UniverSegConfig

    source = tmp_path / "source.pt"
    save_weights(UniverSeg(UniverSegConfig((8, 8, 8), decoder_channels=(6, 4), grid_size=32)), source)
    config = tiny_config(steps=3, init_weights=str(source))
    train(config, tmp_path / "run", device="cpu", stop_after=1)
    source.unlink()  # moved, or a relative path resumed from another folder
    assert train(tiny_config(steps=0), tmp_path / "run", resume=True, device="cpu")["step"] == 3
    assert network_from_file(tmp_path / "run" / "weights.pt").config.decoder_channels == (6, 4)


def test_the_grid_is_checked_against_the_source_weights_before_anything_is_written(tmp_path):
    from napari_openseg.model.registry import save_weights
    from napari_openseg.model.universeg import build_network

    five_levels = save_weights(build_network((4, 4, 4, 4, 4), grid_size=32), tmp_path / "deep.pt")
    with pytest.raises(OpenSegError, match="multiple of 16 with 5 encoder widths"):
        train(tiny_config(grid=24, init_weights=str(five_levels)), tmp_path / "run", device="cpu")
    assert not (tmp_path / "run").exists()
    two_levels = save_weights(build_network((4, 4), grid_size=16), tmp_path / "shallow.pt")
    # a grid that only the run's own --widths (three levels) would refuse
    assert (
        train(tiny_config(steps=1, grid=18, init_weights=str(two_levels)), tmp_path / "ok", device="cpu")[
            "step"
        ]
        == 1
    )


def test_resuming_a_run_that_is_already_that_long_is_refused(tmp_path):
    train(tiny_config(steps=2), tmp_path / "run", device="cpu")
    for steps in (0, 1, 2):  # 0: the stored length
        with pytest.raises(OpenSegError, match="at step 2 of .* already; pass a larger --steps"):
            train(tiny_config(steps=steps), tmp_path / "run", resume=True, device="cpu")


def test_a_run_that_fails_before_its_first_step_leaves_no_checkpoint(tmp_path, monkeypatch):
    from napari_openseg.training.incontext import trainer

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(trainer, "fast_forward", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        train(tiny_config(steps=2), tmp_path / "run", device="cpu")
    assert not (tmp_path / "run" / CHECKPOINT).exists()
    monkeypatch.undo()
    assert (
        train(tiny_config(steps=2), tmp_path / "run", device="cpu")["step"] == 2
    )  # started again, not refused


def test_an_interrupted_write_of_best_pt_is_written_again_at_the_next_validation(tmp_path, monkeypatch):
    from napari_openseg.training.incontext import trainer

    real_save = trainer.save_weights

    def ctrl_c_on_best(net, path, info=None, **kwargs):
        if path.name == "best.pt":
            raise KeyboardInterrupt
        return real_save(net, path, info, **kwargs)

    monkeypatch.setattr(trainer, "save_weights", ctrl_c_on_best)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(steps=4, val_every=2, lr=0.0), tmp_path / "run", device="cpu")
    assert torch.load(tmp_path / "run" / CHECKPOINT, weights_only=True)["best"] == -1.0  # not recorded
    monkeypatch.undo()
    train(tiny_config(steps=0), tmp_path / "run", resume=True, device="cpu")
    assert (tmp_path / "run" / "best.pt").is_file()  # lr 0: the next validation scores the same, and wins


def test_a_run_interrupted_between_log_records_logs_the_same_losses_once_resumed(tmp_path):
    from napari_openseg.training.incontext.trainer import iter_train

    config = tiny_config(steps=6, log_every=3, val_every=100, checkpoint_every=100)
    train(config, tmp_path / "whole", device="cpu")
    run = iter_train(config, tmp_path / "parts", device="cpu")
    for _ in range(3):  # the start record and two steps: one short of the first log record
        next(run)
    run.close()
    train(tiny_config(steps=0), tmp_path / "parts", resume=True, device="cpu")
    assert losses(tmp_path / "whole") == losses(tmp_path / "parts") and len(losses(tmp_path / "whole")) == 2
