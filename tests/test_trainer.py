"""The inner step: accumulation equals a bigger batch; the schedule; non-finite losses stop."""

from __future__ import annotations

import math

import pytest
import torch

from distrain.config import ModelConfig, TrainConfig
from distrain.model import Transformer
from distrain.optim import lr_multiplier
from distrain.inner.single import SingleSchedule


def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32))


def batches(n: int, size: int):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 50, (size, 17), generator=g) for _ in range(n)]


def feeder(seqs):
    it = iter(seqs)

    def next_batch():
        s = next(it)
        return s[:, :-1], s[:, 1:]

    return next_batch


def test_gradient_accumulation_equals_the_concatenated_batch():
    small = batches(4, 2)
    big = [torch.cat(small[0:2]), torch.cat(small[2:4])]
    a, b = model(), model()
    grads = {"a": [], "b": []}  # the grad_sync hook sees the accumulated gradients before the step
    ta = SingleSchedule(a, TrainConfig(steps=2, grad_accum=2, warmup_steps=0), feeder(small), torch.device("cpu"),
                      grad_sync=lambda g: grads["a"].append([x.clone() for x in g]))
    tb = SingleSchedule(b, TrainConfig(steps=2, grad_accum=1, warmup_steps=0), feeder(big), torch.device("cpu"),
                      grad_sync=lambda g: grads["b"].append([x.clone() for x in g]))
    for _ in range(2):
        ra, rb = ta.train_step(), tb.train_step()
        assert ra.tokens == rb.tokens == 64
        assert float(ra.loss) == pytest.approx(float(rb.loss), rel=1e-6)
    for step in range(2):
        for ga, gb in zip(grads["a"][step], grads["b"][step]):
            torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-7)


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_multiplier(0, cfg) == pytest.approx(0.1)
    assert lr_multiplier(9, cfg) == pytest.approx(1.0)
    assert lr_multiplier(10, cfg) == pytest.approx(1.0)
    assert lr_multiplier(55, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_multiplier(100, cfg) == pytest.approx(0.1)
    mids = [lr_multiplier(s, cfg) for s in range(10, 101)]
    assert all(x >= y for x, y in zip(mids, mids[1:]))


def test_clipping_bounds_the_update_and_nan_loss_is_an_error():
    m = model()
    seqs = batches(1, 2)
    t = SingleSchedule(m, TrainConfig(steps=1, grad_clip=1e-3, warmup_steps=0), feeder(seqs), torch.device("cpu"))
    res = t.train_step()
    assert res.grad_norm > 1e-3  # reported before clipping
    with torch.no_grad():
        m.layers["0"].attention.wq.weight.fill_(float("nan"))
    t.next_batch = feeder(batches(1, 2))
    with pytest.raises(FloatingPointError, match="non-finite training loss"):
        t.train_step()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_an_inner_step_on_cuda_waits_for_no_host_sync():
    """Loss and norm stay on the device; batches come from pinned memory: torch's sync debug mode
    (error) finds no synchronising call in a step."""
    device = torch.device("cuda")
    m = model().to(device)
    t = SingleSchedule(m, TrainConfig(steps=3, warmup_steps=0), feeder(batches(4, 2)), device)
    t.train_step()  # the first step allocates AdamW's state
    torch.cuda.set_sync_debug_mode("error")
    try:
        res = t.train_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert res.loss.is_cuda and math.isfinite(float(res.loss))
