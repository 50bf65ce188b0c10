"""The training recipe's engine parts: EMA of the trainable weights, and gradient accumulation giving the
update of the larger batch."""
from __future__ import annotations

import copy
import math

import torch

from detsweep import engine


class _Regressor(torch.nn.Module):
    """The detector contract at its smallest: train mode returns a loss dict (mean over the batch's images,
    as a detector's losses are)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(4, 3)
        self.frozen = torch.nn.Linear(3, 3)
        self.frozen.requires_grad_(False)

    def forward(self, images, targets):
        x = torch.stack([im.flatten()[:4] for im in images])
        y = torch.stack([t["y"] for t in targets])
        return {"loss_mse": ((self.frozen(self.body(x)) - y) ** 2).mean()}


def _batches(n: int, size: int):
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 2, 2, generator=g) for _ in range(n)]
    targets = [{"y": torch.rand(3, generator=g)} for _ in range(n)]
    return [(images[i:i + size], targets[i:i + size]) for i in range(0, n, size)]


def test_accumulating_two_batches_of_two_gives_the_update_of_one_batch_of_four():
    torch.manual_seed(0)
    big, small = _Regressor(), None
    small = copy.deepcopy(big)
    cpu = torch.device("cpu")
    for model, loader, accumulate in ((big, _batches(4, 4), 1), (small, _batches(4, 2), 2)):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        steps = []
        engine.train_one_epoch(model, loader, opt, cpu, epoch=0, accumulate=accumulate,
                               on_step=lambda: steps.append(1))
        assert len(steps) == 1  # one optimizer step either way
    for a, b in zip(big.parameters(), small.parameters()):
        assert torch.allclose(a, b, atol=1e-5)


def test_a_partial_last_accumulation_still_steps():
    model = _Regressor()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    steps = []
    engine.train_one_epoch(model, _batches(6, 2), opt, torch.device("cpu"), epoch=0, accumulate=2,
                           on_step=lambda: steps.append(1))
    assert len(steps) == 2  # batches 1-2, then 3 alone


def test_ema_equals_the_hand_computed_average_after_three_steps():
    model = _Regressor()
    decay, warmup = 0.9, 2
    ema = engine.EMA(model, decay=decay, warmup_steps=warmup)
    assert ema.names == ["body.weight", "body.bias"]  # trainable parameters only: no copy of the frozen layer
    w = model.body.weight
    expected = w.detach().clone()  # the first update copies the live weights
    history = []
    for step in range(1, 4):
        with torch.no_grad():
            w.add_(0.5)  # an optimizer step
        history.append(w.detach().clone())
        ema.update(model)
        if step > 1:
            d = decay * (1 - math.exp(-step / warmup))
            expected = d * expected + (1 - d) * history[-1]
        else:
            expected = history[-1].clone()
    averaged = next(iter(ema.average.module.parameters()))
    assert torch.allclose(averaged, expected, atol=1e-6)
    live = w.detach().clone()
    with ema.applied(model):
        assert torch.allclose(model.body.weight, expected, atol=1e-6)
    assert torch.equal(model.body.weight, live)  # swapped back


def test_ema_state_round_trips():
    model = _Regressor()
    ema = engine.EMA(model, decay=0.5)
    ema.update(model)
    with torch.no_grad():
        model.body.weight.add_(1.0)
    ema.update(model)
    other = engine.EMA(model, decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.steps == 2
    for a, b in zip(ema.average.module.parameters(), other.average.module.parameters()):
        assert torch.equal(a, b)


def test_the_best_evaluation_is_the_best_by_its_metric_and_survives_a_restore():
    """`Best` picks the highest AP (the lowest val_loss), counts evaluations since, and round-trips through
    the checkpoint's train_state (`dataclasses.asdict` there, `Best(**state["best"])` on restore)."""
    import dataclasses

    from detsweep.cluster.evaluation import Best

    best = Best()
    for epoch, ap in enumerate([0.10, 0.30, 0.20]):
        best.offer("ap", epoch, {"ap": ap, "ap50": ap + 0.1})
    assert (best.epoch, best.value, best.since, best.metrics["ap50"]) == (1, 0.30, 1, 0.4)
    restored = Best(**dataclasses.asdict(best))
    assert restored == best
    assert restored.offer("ap", 3, {"ap": 0.25}) is False and restored.since == 2 and restored.epoch == 1
    lowest = Best()
    for epoch, loss in enumerate([3.0, 2.0, 2.5]):
        lowest.offer("val_loss", epoch, {"val_loss": loss})
    assert (lowest.epoch, lowest.value) == (1, 2.0)
