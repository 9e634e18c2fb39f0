"""The model leaves and enters the run: ``distrain export`` to a Hugging Face LLaMA directory,
``model.init_from`` (continued pre-training), ``distrain eval`` and ``distrain generate``."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from distrain.cli.main import main
from distrain.config import ConfigError
from distrain.inference import load_model, sample, score, text_ids
from distrain.runtime.pool import LoopState
from distrain.runtime.simulation import Simulation
from distrain.weights.export import export_run
from distrain.weights.hf import read_hf_weights
from distrain.weights.source import WeightsError

SHORT = ["--train.steps=4", "--outer.inner_steps=2", "--train.eval_every=4", "--runtime.torch_threads=1"]
PIPELINE = "--topology.replica=[{count=1}, {kind='pipeline', stages=2, compress={k=4}}]"


def trained(tiny_config, name: str, *extra: str) -> Simulation:
    sim = Simulation(tiny_config(*SHORT, f"--run.name={name}", *extra))
    sim.run()
    return sim


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("tie", [False, True])
def test_export_loads_in_transformers_with_our_logits(tiny_config, tmp_path, tie, capsys):
    transformers = pytest.importorskip("transformers")
    sim = trained(tiny_config, f"tie{tie}", f"--model.tie_embeddings={str(tie).lower()}")
    out = tmp_path / "hf"
    assert main(["export", str(sim.run_dir), "--out", str(out)]) == 0
    assert f"exported step 4 of {sim.run_dir}" in capsys.readouterr().out
    hf = transformers.LlamaForCausalLM.from_pretrained(str(out)).eval()
    ours = load_model(sim.run_dir)
    assert ours.source.kind == "run" and ours.source.step == 4
    tokens = torch.randint(0, ours.model.cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, ours.model(tokens), rtol=0, atol=1e-4)
    # the global weights are what the run ended on: a full replica's model holds them after the last round
    for name, p in sim.workers[0].model.named_parameters():
        assert torch.equal(dict(ours.model.named_parameters())[name], p.detach()), name
    # and the tokenizer is the run's, as transformers reads it
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    text = "the model trains on data across slow links"
    assert tok(text).input_ids == ours.tokenizer.encode(text)
    assert tok.eos_token_id == ours.tokenizer.eos_id and tok.decode(tok(text).input_ids) == text
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is tie and ("output.weight" in read_hf_weights(out)) is not tie


def test_a_compressed_pipeline_run_exports_an_ordinary_model(tiny_config, tmp_path):
    """The global weights are in the ordinary parameterisation: the export is an unconstrained model
    (attention-out is not confined to the pipeline's subspace) whose logits are our whole model's."""
    from distrain.parallel.pipeline.subspace import make_basis

    from distrain.model import Transformer

    sim = trained(tiny_config, "mixed", "--outer.algorithm=sparseloco", PIPELINE)
    stage0, stage1 = sim.workers[1], sim.workers[2]
    assert not stage0.view.exact  # the pipeline really was compressed
    done = export_run(sim.run_dir, tmp_path / "hf")
    exported = read_hf_weights(done.out)
    glob = {**stage0.global_state(), **stage1.global_state()}
    assert exported.keys() == glob.keys() == sim.workers[0].global_state().keys()
    assert all(torch.equal(exported[n], glob[n]) for n in glob)
    u = make_basis(64, 4, 1337)
    w = exported["layers.0.attention.wo.weight"]
    assert float((w - u @ (u.T @ w)).norm() / w.norm()) > 0.5  # far outside the 4-dim subspace
    whole = Transformer(sim.workers[0].model.cfg, seed=1)
    with torch.no_grad():
        for n, p in whole.named_parameters():
            p.copy_(glob[n])
    tokens = torch.randint(0, whole.cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    try:
        import transformers
    except ImportError:
        got = load_model(done.out).model
    else:
        got = transformers.LlamaForCausalLM.from_pretrained(str(done.out)).eval()
    with torch.no_grad():
        logits = got(tokens)
        torch.testing.assert_close(getattr(logits, "logits", logits), whole(tokens), rtol=0, atol=1e-4)


def start_of(cfg) -> Simulation:
    """A run built (every worker at its initial weights) and checkpointed at step 0, not trained."""
    sim = Simulation(cfg)
    sim.pool.save(0, LoopState().to_dict())
    sim.pool.close()
    return sim


def test_init_from_an_export_round_trips_bit_exactly(tiny_config, tmp_path):
    sim = trained(tiny_config, "first")
    first = export_run(sim.run_dir, tmp_path / "first")
    # every replica kind starts from the exported weights: a full replica and a compressed pipeline's stages
    again = start_of(tiny_config("--outer.algorithm=sparseloco", PIPELINE, f"--model.init_from={first.out}",
                                 "--run.name=again"))
    want = read_hf_weights(first.out)
    for w in again.workers:
        assert all(torch.equal(t, want[n]) for n, t in w.global_state().items())
    second = export_run(again.run_dir, tmp_path / "second", step=0)
    assert (second.out / "model.safetensors").read_bytes() == (first.out / "model.safetensors").read_bytes()
    assert json.loads((second.out / "config.json").read_text()) == json.loads((first.out / "config.json").read_text())
    assert (second.out / "tokenizer.json").read_bytes() == (first.out / "tokenizer.json").read_bytes()


def test_a_run_continues_from_init_from(tiny_config):
    """Continued pre-training from a run directory: the new run's first validation loss is the old
    run's last (same weights, same validation batches), and it trains on from there."""
    first = trained(tiny_config, "old", "--train.eval_batches=2")
    summary = Simulation(tiny_config(*SHORT, "--run.name=new", f"--model.init_from={first.run_dir}")).run()
    old = json.loads((first.run_dir / "summary.json").read_text())
    assert summary.first_val_loss == pytest.approx(old["final_val_loss"], abs=1e-6)
    # a checkpoint directory of the run names that step of it
    step_dir = first.run_dir / "checkpoints" / "step-4"
    sim = start_of(tiny_config(f"--model.init_from={step_dir}", "--run.name=fromstep"))
    assert all(torch.equal(sim.workers[0].global_state()[n], t) for n, t in first.workers[0].global_state().items())


def test_init_from_with_another_tokenizer_is_named(tiny_config, tmp_path, caplog):
    first = export_run(trained(tiny_config, "tok").run_dir, tmp_path / "hf")
    with caplog.at_level("WARNING"):
        start_of(tiny_config(f"--model.init_from={first.out}", "--run.name=same"))
    assert "another tokenizer" not in caplog.text
    with caplog.at_level("WARNING"):
        sim = start_of(tiny_config(f"--model.init_from={first.out}", "--data.vocab_size=300", "--run.name=other"))
    assert "was trained with another tokenizer" in caplog.text and f"data.tokenizer={first.out}" in caplog.text
    assert sim.cfg.model.vocab_size == 320  # the weights' vocabulary, not the new tokenizer's


def test_eval_perplexity_is_exp_of_the_mean_loss(tiny_config, tmp_path, capsys):
    sim = trained(tiny_config, "ev")
    text = " ".join(["error feedback keeps what was not sent for later rounds"] * 12)
    data = tmp_path / "held_out.txt"
    data.write_text(text)
    assert main(["eval", str(sim.run_dir), "--data", str(data), "--seq-len", "16"]) == 0
    got = json.loads(capsys.readouterr().out)
    m = load_model(sim.run_dir)
    ids = [m.tokenizer.eos_id] + m.tokenizer.encode(text)
    losses = []
    with torch.no_grad():
        for s in range(0, len(ids) - 1, 16):
            window = torch.tensor([ids[s:s + 17]])
            losses.append(F.cross_entropy(m.model(window[:, :-1])[0], window[0, 1:], reduction="none"))
    mean = float(torch.cat(losses).double().mean())
    assert got["tokens"] == len(ids) - 1 > 16 * 3
    assert got["loss"] == pytest.approx(mean, rel=1e-6)
    assert got["perplexity"] == pytest.approx(math.exp(mean), rel=1e-6)
    assert score(m.model, ids, 1000).tokens == len(ids) - 1  # one window, capped at max_seq_len


def test_generate_is_deterministic_for_a_seed(tiny_config, capsys):
    sim = trained(tiny_config, "gen")
    m = load_model(sim.run_dir)
    prompt = text_ids(m.tokenizer, "the model")
    a = sample(m.model, prompt, 12, temperature=0.9, top_k=20, seed=5)
    assert len(a) == 12 and a == sample(m.model, prompt, 12, temperature=0.9, top_k=20, seed=5)
    assert a != sample(m.model, prompt, 12, temperature=0.9, top_k=20, seed=6)
    greedy = sample(m.model, prompt, 5, temperature=0)
    with torch.no_grad():
        assert greedy[0] == int(m.model(torch.tensor([prompt]))[0, -1].argmax())
    args = ["generate", str(sim.run_dir), "--prompt", "the model", "--max-new-tokens", "12", "--seed", "5",
            "--top-k", "20", "--temperature", "0.9"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert main(args) == 0 and capsys.readouterr().out == out
    assert out == "the model" + m.tokenizer.decode(a) + "\n"


def test_bad_inputs_are_one_line_errors(tiny_config, tmp_path, capsys):
    assert main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "no such directory" in one_line_error(capsys)
    empty = tmp_path / "runs" / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    assert main(["export", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "holds no checkpoint" in one_line_error(capsys)
    old = tmp_path / "runs" / "old"  # the per-rank layout of earlier versions is refused, not misread
    (old / "checkpoints" / "rank-0" / "step-3").mkdir(parents=True)
    assert main(["export", str(old), "--out", str(tmp_path / "o")]) == 2
    assert "per-rank checkpoints (checkpoints/rank-K/step-N) of an earlier distrain version" in one_line_error(capsys)
    assert main(["eval", str(tmp_path), "--data", __file__]) == 2
    assert "is neither a Hugging Face LLaMA directory" in one_line_error(capsys)
    with pytest.raises(ConfigError, match="model.init_from: .*no such directory"):
        tiny_config(f"--model.init_from={tmp_path / 'missing'}")
    with pytest.raises(ConfigError, match="model.init_from: .*neither"):
        tiny_config(f"--model.init_from={tmp_path}")
    sim = trained(tiny_config, "shape")
    assert main(["export", str(sim.run_dir), "--step", "3", "--out", str(tmp_path / "o")]) == 2
    assert "no checkpoint of step 3 (steps: 4)" in one_line_error(capsys)
    out = export_run(sim.run_dir, tmp_path / "hf").out
    with pytest.raises(ConfigError, match=r"tensor layers.0.attention.wk.weight \(model.layers.0.self_attn.k_proj"
                                          r".weight\) of .* has shape \[32, 64\], the configured model needs \[64, 64\]"):
        tiny_config(f"--model.init_from={out}", "--model.n_kv_heads=4")
    with pytest.raises(ConfigError, match=r"tensor tok_embeddings.weight .* has shape \[320, 64\], the configured "
                                          r"model needs \[any, 32\]"):
        tiny_config(f"--model.init_from={out}", "--model.dim=32", "--model.n_heads=2", "--model.n_kv_heads=1")
    with pytest.raises(ConfigError, match="has no tensor layers.2.attention_norm.weight"):
        tiny_config(f"--model.init_from={sim.run_dir}", "--model.n_layers=3")
    with pytest.raises(ConfigError, match="separate output head"):
        tiny_config(f"--model.init_from={out}", "--model.tie_embeddings=true")
    # on the command line: exit 2 with one line, before any run directory is made
    code = main(["simulate", f"--model.init_from={tmp_path / 'missing'}", f"--run.out_dir={tmp_path / 'never'}"])
    assert code == 2 and one_line_error(capsys).startswith("distrain: config error: model.init_from:")
    assert not (tmp_path / "never").exists()
    with pytest.raises(WeightsError, match="Hugging Face directory already"):
        export_run(out, tmp_path / "again")
