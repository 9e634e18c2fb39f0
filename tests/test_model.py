import pytest
import torch

from distrain.config import ModelConfig
from distrain.model import MODEL_PRESETS, KVPrefix, Transformer, count_parameters


def small_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=97, dim=64, n_layers=4, n_heads=8, n_kv_heads=2, max_seq_len=64)
    base.update(kw)
    return ModelConfig(**base)


def to_hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    out = {"model.embed_tokens.weight": model.tok_embeddings.weight, "model.norm.weight": model.norm.weight,
           "lm_head.weight": model.output.weight}
    names = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
             "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
             "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    for i, layer in model.layers.items():
        for ours, theirs in names.items():
            mod = layer.get_submodule(ours)
            out[f"model.layers.{i}.{theirs}.weight"] = mod.weight
    return out


@pytest.mark.parametrize("tie", [False, True])
def test_logits_match_transformers_llama(tie):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = small_cfg(tie_embeddings=tie)
    ours = Transformer(cfg).double()
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=ours.layers["0"].feed_forward.w1.out_features,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        tie_word_embeddings=tie, attention_bias=False, mlp_bias=False,
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).double().eval()
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(ours), strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    tokens = torch.randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        expected = hf(tokens).logits
        got = ours(tokens)
    # RoPE tables are fp32 in both models, so fp64 logits agree to ~1e-8, not machine epsilon.
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    # and in fp32, the precision we train in
    with torch.no_grad():
        got32 = ours.float()(tokens)
        exp32 = hf.float()(tokens).logits
    torch.testing.assert_close(got32, exp32, rtol=1e-5, atol=1e-5)


def test_stage_split_equals_whole_model():
    torch.manual_seed(1)
    cfg = small_cfg()
    whole = Transformer(cfg)
    stages = [Transformer(cfg, 0, 1), Transformer(cfg, 1, 3), Transformer(cfg, 3, 4)]
    sd = whole.state_dict()
    for s in stages:
        own = s.state_dict()
        assert set(own) <= set(sd)
        s.load_state_dict({k: sd[k] for k in own})
    assert sum(count_parameters(s) for s in stages) == count_parameters(whole)
    assert stages[0].output is None and stages[1].tok_embeddings is None and stages[2].tok_embeddings is None
    tokens = torch.randint(0, cfg.vocab_size, (3, 17))
    h = tokens
    for s in stages:
        h = s(h)
    torch.testing.assert_close(h, whole(tokens), rtol=0, atol=0)


def test_kv_prefix_equals_full_sequence():
    torch.manual_seed(2)
    cfg = small_cfg()
    m = Transformer(cfg, 0, 1)
    tokens = torch.randint(0, cfg.vocab_size, (2, 24))
    full = m(tokens)
    layer = m.layers["0"]
    h = m.embed(tokens[:, :10])
    cos, sin = m.rope(0, 10)
    k, v = layer.attention.project_kv(layer.attention_norm(h), cos, sin)
    second = m(tokens[:, 10:], start_pos=10, prefixes=[KVPrefix(k, v)])
    torch.testing.assert_close(second, full[:, 10:], rtol=1e-5, atol=1e-6)


def test_invalid_stage_and_presets():
    with pytest.raises(ValueError, match="stage"):
        Transformer(small_cfg(), 3, 3)
    for name, p in MODEL_PRESETS.items():
        cfg = ModelConfig(**{**p, "vocab_size": 8192})
        assert cfg.dim % cfg.n_heads == 0 and cfg.n_heads % cfg.n_kv_heads == 0, name
