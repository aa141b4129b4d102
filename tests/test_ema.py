"""The weight average (EMA) of trained parameters: its recurrence, what it replaces, its checkpoint round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from unirl.train import CheckpointError, EngineConfig, build_engine
from unirl.train.checkpoint import load_checkpoint, save_training_checkpoint
from unirl.train.ema import WeightEMA


def _trained(seed: int = 0) -> tuple[nn.Module, object]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    model[1].requires_grad_(False)  # frozen: never averaged
    engine = build_engine(model, [{"params": list(model.parameters()), "lr": 0.1, "name": "all"}],
                          EngineConfig(grad_clip=0.0))
    return model, engine


def _step(model: nn.Module, engine, k: int) -> None:
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(k))
    engine.backward(model(x).pow(2).mean())
    engine.step()


def test_average_follows_the_warmed_up_recurrence_over_trained_parameters_only() -> None:
    model, engine = _trained()
    ema = WeightEMA(engine.trainable, decay=0.8)
    assert [n for n, _ in engine.trainable] == ["0.weight", "0.bias"]
    expect = {n: p.detach().clone() for n, p in engine.trainable}
    decays = []
    for k in range(40):
        _step(model, engine, k)
        d = ema.current_decay()
        decays.append(d)
        ema.update()
        for n, p in engine.trainable:
            expect[n] = d * expect[n] + (1 - d) * p.detach()
    assert decays[:3] == pytest.approx([1 / 10, 2 / 11, 3 / 12])  # the warm-up, then the configured decay
    assert decays[-1] == 0.8 and decays[30] < 0.8
    for n, _ in engine.trainable:
        torch.testing.assert_close(ema.shadow[n], expect[n], rtol=0, atol=1e-6)
        assert not torch.allclose(ema.shadow[n], dict(model.named_parameters())[n])  # an average, not the iterate
    state = {k: v.clone() for k, v in model.state_dict().items()}
    avg = ema.averaged({k: v.to(torch.bfloat16) for k, v in state.items()})
    assert avg["0.weight"].dtype == torch.bfloat16
    torch.testing.assert_close(avg["0.weight"].float(), ema.shadow["0.weight"], rtol=1e-2, atol=1e-2)
    assert torch.equal(avg["1.weight"], state["1.weight"].to(torch.bfloat16))  # frozen: the module's own


def test_average_without_warmup_starts_at_the_initial_weights() -> None:
    model, engine = _trained()
    ema = WeightEMA(engine.trainable, decay=0.9, warmup=False)
    init = {n: p.detach().clone() for n, p in engine.trainable}
    _step(model, engine, 0)
    assert ema.current_decay() == 0.9
    ema.update()
    for n, p in engine.trainable:  # 0.9 of the initial weights after one update (the warm-up would keep 0.1)
        torch.testing.assert_close(ema.shadow[n], 0.9 * init[n] + 0.1 * p.detach(), rtol=0, atol=1e-7)


def test_average_survives_a_checkpoint_and_bad_states_get_clear_errors(tmp_path: Path) -> None:
    model, engine = _trained()
    ema = WeightEMA(engine.trainable, decay=0.99)
    for k in range(5):
        _step(model, engine, k)
        ema.update()
    path = save_training_checkpoint(engine, tmp_path / "run", 5, stage_state={"ema": ema.state_dict()})
    loaded = load_checkpoint(path)
    again = WeightEMA(_trained(1)[1].trainable, decay=0.99)
    again.load_state_dict(loaded.engine_state["stage"]["ema"], path)
    assert again.updates == 5 and again.current_decay() == ema.current_decay()
    for n in ema.shadow:
        assert torch.equal(again.shadow[n], ema.shadow[n])

    with pytest.raises(CheckpointError, match="no weight average"):
        again.load_state_dict(None, path)
    with pytest.raises(CheckpointError, match="decay 0.99, this run 0.5"):
        WeightEMA(engine.trainable, decay=0.5).load_state_dict(loaded.engine_state["stage"]["ema"], path)
    with pytest.raises(CheckpointError, match="warmup=True, this run False"):
        WeightEMA(engine.trainable, decay=0.99, warmup=False).load_state_dict(loaded.engine_state["stage"]["ema"])
    other = nn.Linear(4, 3)
    with pytest.raises(CheckpointError, match="missing key"):
        WeightEMA([("w", other.weight)], decay=0.99).load_state_dict(loaded.engine_state["stage"]["ema"], path)
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        WeightEMA(engine.trainable, decay=1.0)
