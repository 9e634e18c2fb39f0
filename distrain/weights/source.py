"""Where a model's weights come from outside the run: what ``model.init_from``, ``distrain eval``
and ``distrain generate`` accept — a Hugging Face LLaMA directory, a distrain run directory
(its newest checkpoint, or ``step``), or one of its ``checkpoints/step-N`` directories (that step of
the run).

Opening a source reads metadata only (config.json and safetensors headers, or a checkpoint's
manifest.json); tensors are read when asked for, by name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any

import torch

from distrain.weights import hf, run
from distrain.weights.shapes import EMBEDDING, OUTPUT, parameter_shapes

_STEP_RE = re.compile(r"^step-(\d+)$")


class WeightsError(ValueError):
    """A weights source is missing, of an unknown kind, or does not fit the model (one line)."""


@dataclass
class Source:
    kind: str  # "hf" | "run"
    root: Path  # the HF directory, or the run directory
    step: int | None  # the run's checkpoint step
    fields: dict[str, Any]  # the model settings it was written with (ModelConfig fields)
    tokenizer: Path | None  # its tokenizer.json, when it has one
    seq_len: int  # the context it was trained on (a run's data.seq_len; an HF model's max positions)
    _shapes: dict[str, tuple[int, ...]] | None = dc_field(default=None, repr=False)

    def describe(self) -> str:
        return f"{self.root} (step {self.step})" if self.kind == "run" else f"{self.root} (Hugging Face)"

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor it holds, by our parameter names."""
        if self._shapes is None:
            self._shapes = hf.hf_shapes(self.root) if self.kind == "hf" else parameter_shapes(self.fields)
        return self._shapes

    def load(self, names: set[str] | None = None) -> dict[str, torch.Tensor]:
        """Its tensors (fp32, CPU) by our names; only ``names`` when given."""
        try:
            if self.kind == "hf":
                return hf.read_hf_weights(self.root, names)
            return run.global_weights(self.root, self.step, names)
        except (hf.HFFormatError, run.RunWeightsError) as e:
            raise WeightsError(str(e)) from None


def open_source(path: str | Path, step: int | None = None) -> Source:
    """The weights at ``path`` (metadata only); a WeightsError says in one line why not."""
    p = Path(path).expanduser()
    if not p.exists():
        raise WeightsError(f"{path}: no such directory")
    if not p.is_dir():
        raise WeightsError(f"{path} is not a directory (give a Hugging Face LLaMA directory or a distrain run)")
    m = _STEP_RE.match(p.name)
    if m and p.parent.name == "checkpoints":
        if step is not None and step != int(m.group(1)):
            raise WeightsError(f"{path} is the checkpoint of step {m.group(1)}, not of step {step}")
        p, step = p.parent.parent, int(m.group(1))
    try:
        if hf.is_hf_dir(p):
            if step is not None:
                raise WeightsError(f"{path} is a Hugging Face directory: it has no steps to choose from")
            fields = hf.fields_from_hf(hf.read_config(p), str(p / hf.CONFIG))
            tok = p / run.TOKENIZER
            return Source("hf", p, None, fields, tok if tok.is_file() else None, fields["max_seq_len"])
        if run.is_run_dir(p):
            step = run.choose_step(p, step)
            fields = run.model_fields(p, step)
            seq_len = int(run.run_config(p, step).get("data", {}).get("seq_len") or fields["max_seq_len"])
            return Source("run", p, step, fields, run.run_tokenizer(p, step), seq_len)
    except (hf.HFFormatError, run.RunWeightsError) as e:
        raise WeightsError(str(e)) from None
    raise WeightsError(f"{path} is neither a Hugging Face LLaMA directory (config.json + model.safetensors) "
                       "nor a distrain run (checkpoints/step-N)")


def _display(source: Source, name: str) -> str:
    return f"{name} ({hf.hf_name(name)})" if source.kind == "hf" else name


def check_fits(source: Source, model: Any) -> None:
    """Raise a WeightsError naming the first tensor whose shape differs from the model configured
    by ``model`` (a ModelConfig or its fields); a vocabulary of 0 (not yet known) fits any."""
    want, have = parameter_shapes(model), source.shapes()
    if OUTPUT not in want and OUTPUT in have:
        raise WeightsError(f"{source.describe()} holds a separate output head ({_display(source, OUTPUT)}) but "
                           "model.tie_embeddings = true")
    for name, shape in want.items():
        got = have.get(EMBEDDING if name == OUTPUT and OUTPUT not in have else name)  # a tied head: the embedding
        if got is None:
            raise WeightsError(f"{source.describe()} has no tensor {_display(source, name)}, which the configured "
                               "model needs (check model.n_layers)")
        if len(got) != len(shape) or any(w and g != w for g, w in zip(got, shape)):
            need = ", ".join(str(w) if w else "any" for w in shape)  # 0: the vocabulary, not known yet
            raise WeightsError(f"tensor {_display(source, name)} of {source.describe()} has shape {list(got)}, the "
                               f"configured model needs [{need}]")
    extra = sorted(set(have) - set(want) - {OUTPUT})
    if extra:
        raise WeightsError(f"{source.describe()} holds {_display(source, extra[0])}, which the configured model does "
                           "not have (check model.n_layers)")


def initial_weights(source: Source, names: set[str]) -> dict[str, torch.Tensor]:
    """The tensors of ``names`` a run starts from (a tied source's embedding serves an untied head)."""
    tied_head = OUTPUT in names and OUTPUT not in source.shapes()
    wanted = (set(names) - {OUTPUT}) | {EMBEDDING} if tied_head else set(names)
    got = source.load(wanted)
    if tied_head:
        got[OUTPUT] = got[EMBEDDING].clone()
        if EMBEDDING not in names:
            del got[EMBEDDING]
    return got
