"""Weak-memory participants: AdamW with torchao's 8-/4-bit moments, per replica (``optimizer``).

The config accepts the names and refuses others in one line; an 8-bit replica trains beside an
AdamW one in the simulation, holding <= 2.5 bytes of state per parameter; its quantised state is
checkpointed by its plain parts, so a resumed run ends exactly where the uninterrupted one does;
and state converts between the optimisers when a replica's ``optimizer`` changes across a resume.
"""

from __future__ import annotations

import gc
import importlib.util
import math
import threading
import time
import weakref

import pytest
import torch
from checkpoints import assert_same, own

from distrain.config import ConfigError, ModelConfig, TrainConfig
from distrain.model import build_model, cross_entropy
from distrain.optim import build_inner_optimizer
from distrain.optim_state import dequantised, flat_state, is_quantised, restore_state, state_bytes
from distrain.runtime.simulation import Simulation, SimulationPool
from distrain.worker.worker import Worker

needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None,
                                   reason="torchao (the lowmem extra) is not installed")

# dim 128: every matrix has >= 4096 values, a multiple of torchao's block, so it is quantised
MODEL = ["--model.dim=128", "--model.n_heads=4", "--model.n_kv_heads=2", "--runtime.torch_threads=1"]
HETERO = "--topology.replica=[{count=1}, {count=1, optimizer='adamw8bit'}]"
RUN = [*MODEL, HETERO, "--outer.algorithm=sparseloco", "--train.steps=12", "--outer.inner_steps=3",
       "--train.eval_every=6", "--checkpoint.every=6", "--train.lr=3e-3"]


# ----- configuration -------------------------------------------------------------------------------
@pytest.mark.parametrize("override,message", [
    ("--train.optimizer=adam8", "train.optimizer: 'adam8' is not one of adamw, adamw8bit, adamw4bit"),
    ("--topology.replica=[{optimizer='sgd'}]", "(replica table 0): optimizer: 'sgd' is not one of adamw, adamw8bit"),
    ("--topology.replica=[{devices=2, parallel='deepspeed', optimizer='adamw8bit'}]",
     "parallel = 'deepspeed' partitions AdamW's fp32 moments itself (ZeRO); its optimizer must be 'adamw'"),
])
def test_a_bad_optimizer_is_one_line_at_load(tiny_config, override, message):
    with pytest.raises(ConfigError) as e:
        tiny_config(override)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_missing_torchao_is_one_line_naming_the_extra(tiny_config, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    with pytest.raises(ConfigError) as e:
        tiny_config(HETERO, "--outer.algorithm=diloco")
    assert str(e.value).endswith("(replica table 1): optimizer = 'adamw8bit' needs torchao: "
                                 "pip install 'distrain[lowmem]'")
    with pytest.raises(ConfigError, match=r"^train.optimizer = 'adamw4bit' needs torchao"):
        tiny_config("--train.optimizer=adamw4bit")
    tiny_config("--train.optimizer=adamw4bit", "--topology.replica=[{optimizer='adamw'}]")  # nobody runs it


@needs_torchao
def test_the_tables_optimizer_overrides_train_optimizer(tiny_config):
    from distrain.topology import resolve_topology

    cfg = tiny_config("--train.optimizer=adamw4bit", "--topology.replica=[{count=2}, {optimizer='adamw'}]",
                      "--outer.algorithm=diloco")
    assert [r.optimizer for r in resolve_topology(cfg)] == ["adamw4bit", "adamw4bit", "adamw"]


# ----- the optimiser's state ---------------------------------------------------------------------
def stepped(name: str, steps: int = 2) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = build_model(ModelConfig(dim=128, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=256, max_seq_len=16))
    opt = build_inner_optimizer(model, TrainConfig(optimizer=name))
    x = torch.randint(0, 256, (2, 16))
    for _ in range(steps):
        cross_entropy(model(x), x).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


@pytest.fixture
def one_thread():
    """torch.compile's update (torchao's) is compiled per intra-op thread count, and its results differ
    bit-wise between counts: these run at the simulation's (runtime.torch_threads = 1), so the run
    below reuses the same kernels in every phase."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@needs_torchao
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name,most", [("adamw8bit", 2.5), ("adamw4bit", 1.5)])
def test_quantised_state_is_rebuilt_exactly_and_converts(name, most):
    model, opt = stepped(name)
    params = sum(p.numel() for p in model.parameters())
    assert state_bytes(opt) / params <= most
    wq = model.layers["0"].attention.wq.weight
    saved = {k: v.clone() for k, v in flat_state(opt.state[wq]).items()}
    assert all(not is_quantised(v) for v in saved.values()) and any(k.endswith(".codes") for k in saved)
    same = restore_state(stepped(name, 0)[1], wq, saved)  # the same optimiser: the very codes
    for k, v in flat_state(same).items():
        assert torch.equal(v, saved[k]), k
    fp32 = restore_state(stepped("adamw", 0)[1], wq, saved)  # plain AdamW: dequantised
    assert set(fp32) == {"step", "exp_avg", "exp_avg_sq"}
    torch.testing.assert_close(fp32["exp_avg"], opt.state[wq]["exp_avg"].dequantize(), rtol=0, atol=0)
    back = restore_state(stepped(name, 0)[1], wq, flat_state(fp32))  # and quantised again: the same codes
    agree = (back["exp_avg"].codes == opt.state[wq]["exp_avg"].codes).float().mean()  # (4-bit: ~all, ties)
    assert agree == 1.0 if name == "adamw8bit" else agree > 0.99, float(agree)
    assert restore_state(opt, model.layers["0"].attention.wk.weight, saved) is None  # another shape
    fmt = next(k for k in saved if k.startswith("exp_avg.")).split(".")[1]
    assert dequantised(fmt, {k.split(".")[-1]: v for k, v in saved.items() if k.startswith("exp_avg.")},
                       torch.Size([3, 7])) is None


@needs_torchao
def test_an_eager_step_never_runs_while_another_thread_compiles():
    """The simulation's workers are threads; torch.compile's "compiling" flag is process-wide, and
    AdamW's eager step reads it (it crashed CI: a float among tensors in _multi_tensor_adam)."""
    torch._dynamo.reset()  # the 8-bit step below compiles afresh, for seconds
    compiling = threading.Thread(target=stepped, args=("adamw8bit", 1))
    eager_model, eager = stepped("adamw", 0)
    seen: list[bool] = []
    eager.register_step_pre_hook(lambda *_: seen.append(torch.compiler.is_compiling()))
    x = torch.randint(0, 256, (2, 16))
    compiling.start()
    deadline = time.monotonic() + 300
    while compiling.is_alive() and time.monotonic() < deadline:
        cross_entropy(eager_model(x), x).backward()
        eager.step()
        eager.zero_grad()
    compiling.join(timeout=max(1.0, deadline - time.monotonic()))
    assert not compiling.is_alive() and len(seen) >= 2
    assert not any(seen), f"{sum(seen)} of {len(seen)} eager steps ran while the other thread compiled"


@pytest.mark.parametrize("name", ["adamw", pytest.param("adamw8bit", marks=needs_torchao)])
def test_the_locked_step_leaves_no_cycle(name):
    """The optimiser is freed when its last reference goes, not at some later collection (a ZeRO
    partition it steps must not outlive the process groups into interpreter shutdown)."""
    _, opt = stepped(name, 1)
    gone = weakref.ref(opt)
    gc.disable()
    try:
        del opt
        assert gone() is None
    finally:
        gc.enable()


# ----- in a run ----------------------------------------------------------------------------------
def losses_of(replica: int, monkeypatch) -> list[float]:
    """Collects ``replica``'s train loss per round."""
    seen: list[float] = []
    original = Worker.run_round

    def run_round(self, *args, **kwargs):
        report = original(self, *args, **kwargs)
        if self.replica == replica:
            seen.append(report.train_loss)
        return report

    monkeypatch.setattr(Worker, "run_round", run_round)
    return seen


@needs_torchao
def test_an_8bit_replica_trains_beside_adamw_and_resumes_exactly(tiny_config, monkeypatch):
    torch._dynamo.reset()  # compiled as a fresh process would (the kernels other tests compiled differ bit-wise)
    seen = losses_of(1, monkeypatch)
    straight = Simulation(tiny_config(*RUN, "--run.name=straight"))
    s1 = straight.run()
    assert len(seen) == 4 and all(math.isfinite(x) for x in seen) and seen[-1] < seen[0] - 0.3, seen
    assert s1.final_val_loss < s1.first_val_loss - 0.3
    adamw, lowmem = (w.schedule.state_bytes_per_param() for w in straight.workers)
    assert lowmem <= 2.5 and adamw >= 8.0, (lowmem, adamw)
    saved = own(straight.run_dir, 1).tensors
    assert saved["optim/layers.0.attention.wq.weight/exp_avg.int8.codes"].dtype == torch.uint8
    assert saved["optim/layers.0.attention.wq.weight/exp_avg_sq.uint8.qmap"].numel() == 256

    cut = Simulation(tiny_config(*RUN, "--run.name=cut"))
    rounds = {"n": 0}
    original = SimulationPool.run_round

    def crash_in_round_three(self, *args, **kwargs):
        if rounds["n"] == 2:
            raise RuntimeError("killed")
        rounds["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SimulationPool, "run_round", crash_in_round_three)
    with pytest.raises(RuntimeError, match="killed"):
        cut.run()
    monkeypatch.setattr(SimulationPool, "run_round", original)
    resumed = Simulation(tiny_config(*RUN, "--run.name=cut", "--checkpoint.resume=auto"))
    resumed.loop.start()
    assert resumed.loop.resumed_from == 6
    saved6 = own(cut.run_dir, 1).tensors  # the newest checkpoint of the cut run: step 6
    held, _ = resumed.workers[1].schedule.state_tensors()
    assert_same({k: v for k, v in held.items() if k.startswith("optim/")},
                {k: v for k, v in saved6.items() if k.startswith("optim/")})  # rebuilt bit for bit
    resumed.loop.start = lambda: None  # started above
    s2 = resumed.run()
    # bit for bit: before the optimiser steps took the step lock, the AdamW replica's steps that ran while
    # the 8-bit one compiled used float32 bias corrections, and the uninterrupted run drifted from this one
    assert s2.final_val_loss == s1.final_val_loss, (s2.final_val_loss, s1.final_val_loss)

    # the replica's optimiser may change across a resume: its 8-bit moments become fp32 ones
    swapped = Simulation(tiny_config(*[a for a in RUN if a != HETERO], "--topology.replicas=2", "--train.steps=15",
                                     "--run.name=cut", "--checkpoint.resume=auto"))
    swapped.loop.start()
    worker = swapped.workers[1]
    assert not any(is_quantised(v) for st in worker.schedule.optimizer.state.values() for v in st.values())
    wq = dict(worker.model.named_parameters())["layers.0.attention.wq.weight"]
    parts = {k.split(".")[-1]: v for k, v in own(resumed.run_dir, 1).tensors.items()
             if k.startswith("optim/layers.0.attention.wq.weight/exp_avg.")}
    assert torch.equal(worker.schedule.optimizer.state[wq]["exp_avg"], dequantised("int8", parts, wq.shape))
    swapped.pool.close()
