"""``distrain export``: a run's global weights as a Hugging Face LLaMA directory.

``config.json`` + ``model.safetensors`` (fp32, HF names) + the run's tokenizer (``tokenizer.json``,
``tokenizer_config.json``, ``special_tokens_map.json``): what ``transformers`` loads with
``LlamaForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``, without code of ours.
Needs only torch, safetensors and tokenizers.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from distrain.data.tokenizer import Tokenizer, TokenizerError
from distrain.weights import hf
from distrain.weights.source import Source, WeightsError, open_source


@dataclass
class Exported:
    out: Path
    source: Source
    parameters: int
    files: list[Path]


def tokenizer_config(tok: Tokenizer, max_len: int) -> dict[str, object]:
    """A fast tokenizer over tokenizer.json; end-of-text ends documents and opens them (no BOS added)."""
    return {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": tok.eos_token, "bos_token": tok.eos_token,
            "model_max_length": max_len, "add_bos_token": False, "add_eos_token": False,
            "clean_up_tokenization_spaces": False}


def export_run(run_dir: str | Path, out: str | Path, step: int | None = None) -> Exported:
    """Write the global weights of ``run_dir`` (newest checkpoint, or ``step``) into ``out``."""
    source = open_source(run_dir, step)
    if source.kind != "run":
        raise WeightsError(f"{run_dir} is a Hugging Face directory already; export reads a distrain run")
    out = Path(out).expanduser()
    if out.resolve() == source.root.resolve():
        raise WeightsError(f"--out {out} is the run directory itself; give another directory")
    if out.exists() and not out.is_dir():
        raise WeightsError(f"--out {out} exists and is not a directory")
    weights = source.load()
    tok = None
    if source.tokenizer is not None:
        try:
            tok = Tokenizer.from_file(source.tokenizer)
        except (TokenizerError, FileNotFoundError) as e:
            raise WeightsError(f"the run's tokenizer: {e}") from None
    out.mkdir(parents=True, exist_ok=True)
    files = [out / hf.WEIGHTS, out / hf.CONFIG]
    hf.write_hf_weights(files[0], weights)
    hf.write_json(files[1], hf.hf_config(source.fields, tok.eos_id if tok else None))
    if tok is not None:
        shutil.copyfile(source.tokenizer, out / "tokenizer.json")
        hf.write_json(out / "tokenizer_config.json", tokenizer_config(tok, source.fields["max_seq_len"]))
        hf.write_json(out / "special_tokens_map.json", {"eos_token": tok.eos_token, "bos_token": tok.eos_token})
        files += [out / "tokenizer.json", out / "tokenizer_config.json", out / "special_tokens_map.json"]
    return Exported(out, source, sum(t.numel() for t in weights.values()), files)
