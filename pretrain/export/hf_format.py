"""The Hugging Face transformers format: a directory `from_pretrained` loads with every key in place.

    model = AutoModelForImageClassification.from_pretrained(OUT_DIR)   # or AutoModel (headless),
    processor = AutoImageProcessor.from_pretrained(OUT_DIR)            # AutoModelForMaskedImageModeling (SimMIM)

Swin becomes `SwinForImageClassification` / `SwinModel`, SwinV2 `Swinv2ForImageClassification`
/ `Swinv2Model`; a SimMIM run (not headless) becomes `SwinForMaskedImageModeling` /
`Swinv2ForMaskedImageModeling`, encoder, mask token and decoder, so its reconstructions
can be reproduced in transformers. The weights are timm's, renamed: transformers keeps
patch merging at the end of a stage (timm at the start of the next), splits the attention's
qkv projection into three, and saves Swin's relative position index, which is written from
timm's equal (unsaved) buffer.

transformers is an optional extra (`pip install '.[hf]'`): asking for this format without
it is a one-line error before anything is consolidated.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from pretrain.export.exported import Exported, ExportError, check_close
from pretrain.export.heads import readable_label

try:
    import transformers
except ImportError:  # the optional extra: check_available() says how to install it
    transformers = None

FILES = ["model.safetensors", "config.json", "preprocessor_config.json"]
RESAMPLE = {"bilinear": 2, "bicubic": 3}  # interpolation -> PIL's code, as preprocessor_config.json holds it


@dataclass(frozen=True)
class Family:
    """How one timm family is named in transformers."""

    config: str  # transformers config class
    classification: str
    base: str
    masked: str
    prefix: str  # of the encoder's weights inside the task models
    # timm block names -> transformers' (after the stage/block prefix), and the qkv split.
    block: tuple[tuple[str, str], ...]
    qkv: tuple[str, str, str]  # query, key, value modules (each gets a third of qkv.weight)
    saved_buffers: tuple[str, ...]  # buffers transformers saves (timm's equal ones are non-persistent)


_V1 = Family("SwinConfig", "SwinForImageClassification", "SwinModel", "SwinForMaskedImageModeling", "swin",
             block=(("norm1.", "layernorm_before."), ("norm2.", "layernorm_after."), ("mlp.fc1.", "mlp.fc1."),
                    ("mlp.fc2.", "mlp.fc2."), ("attn.proj.", "attention.o_proj."),
                    ("attn.relative_position_bias_table", "attention.relative_position_bias.relative_position_bias_table"),
                    ("attn.relative_position_index", "attention.relative_position_bias.relative_position_index")),
             qkv=("attention.q_proj", "attention.k_proj", "attention.v_proj"), saved_buffers=("relative_position_index",))
_V2 = Family("Swinv2Config", "Swinv2ForImageClassification", "Swinv2Model", "Swinv2ForMaskedImageModeling", "swinv2",
             block=(("norm1.", "layernorm_before."), ("norm2.", "layernorm_after."),
                    ("mlp.fc1.", "intermediate.dense."), ("mlp.fc2.", "output.dense."),
                    ("attn.proj.", "attention.output.dense."), ("attn.logit_scale", "attention.self.logit_scale"),
                    ("attn.cpb_mlp.", "attention.self.continuous_position_bias_mlp."),
),
             qkv=("attention.self.query", "attention.self.key", "attention.self.value"), saved_buffers=())
FAMILIES = {False: _V1, True: _V2}  # by BackboneSpec.is_v2

_STEM = (("patch_embed.proj.", "embeddings.patch_embeddings.projection."), ("patch_embed.norm.", "embeddings.norm."),
         ("norm.", "layernorm."))
_BLOCK = re.compile(r"layers\.(\d+)\.blocks\.(\d+)\.(.+)")
_DOWNSAMPLE = re.compile(r"layers\.(\d+)\.downsample\.(.+)")


def check_available() -> None:
    if transformers is None:
        raise ExportError("--format hf needs Hugging Face transformers: pip install '.[hf]'")


def _stage_windows(exported: Exported) -> list[int]:
    """The window each stage attends in (timm and transformers clamp it to a smaller feature map)."""
    spec = exported.spec
    return [min(exported.window_size, exported.img_size // (spec.patch_size * 2**i)) for i in range(len(spec.depths))]


def _check_supported(exported: Exported) -> None:
    """transformers' Swin (V1) sizes its bias tables by the configured window in every stage."""
    if exported.spec.is_v2:
        return
    for stage, window in enumerate(_stage_windows(exported)):
        if window < exported.window_size:
            raise ExportError(f"--format hf: stage {stage} of {exported.arch} at img_size {exported.img_size} has "
                              f"a {window}x{window} feature map, smaller than window {exported.window_size}, "
                              f"which transformers' Swin cannot hold (its bias tables follow the configured "
                              f"window); export timm or official, or train with a window that fits")


def hf_config(exported: Exported, architecture: str) -> Any:
    """The transformers config of the exported model (id2label with readable synset names)."""
    spec, family = exported.spec, FAMILIES[exported.spec.is_v2]
    args: dict[str, Any] = dict(
        image_size=exported.img_size, patch_size=spec.patch_size, num_channels=3, embed_dim=spec.embed_dim,
        depths=list(spec.depths), num_heads=list(spec.num_heads), window_size=exported.window_size,
        mlp_ratio=float(exported.model.layers[0].blocks[0].mlp.fc1.out_features / spec.embed_dim), qkv_bias=True,
        hidden_act="gelu", use_absolute_embeddings=False, layer_norm_eps=1e-5, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, encoder_stride=spec.patch_size * 2 ** (len(spec.depths) - 1),
        architectures=[architecture],
    )
    if spec.is_v2:
        # The windows trained in, per stage: fine-tuning at another window scales the continuous
        # position bias coordinates from these (equal to the trained model's coordinates here).
        args["pretrained_window_sizes"] = _stage_windows(exported)
    if exported.num_classes:
        args["id2label"] = {i: readable_label(name) for i, name in enumerate(exported.label_names)}
        args["label2id"] = {label: i for i, label in args["id2label"].items()}
    config = getattr(transformers, family.config)(**args)
    config.pretrain = {"arch": exported.arch, "objective": exported.objective,
                       "class_names": exported.label_names,
                       **{k: exported.facts.get(k) for k in ("step", "label_map_version", "head_subset")}}
    return config


def _attention(family: Family, prefix: str, name: str, value: torch.Tensor, out: dict[str, torch.Tensor]) -> bool:
    """Split timm's fused qkv weight (and its biases) into transformers' three projections."""
    if name == "attn.qkv.weight":
        for module, part in zip(family.qkv, value.chunk(3, dim=0)):
            out[f"{prefix}{module}.weight"] = part
        return True
    if name == "attn.qkv.bias":  # V1: one fused bias
        for module, part in zip(family.qkv, value.chunk(3, dim=0)):
            out[f"{prefix}{module}.bias"] = part
        return True
    if name in ("attn.q_bias", "attn.v_bias"):  # V2: query and value biases only, the key has none
        out[f"{prefix}{family.qkv[0 if name == 'attn.q_bias' else 2]}.bias"] = value
        return True
    return False


def hf_state_dict(model: torch.nn.Module, is_v2: bool, prefix: str) -> dict[str, torch.Tensor]:
    """timm Swin weights (and the buffers transformers saves) under transformers' names."""
    family = FAMILIES[is_v2]
    timm_state = dict(model.state_dict())
    for name, buffer in model.named_buffers():  # non-persistent in timm, saved by transformers
        if family.saved_buffers and name.endswith(family.saved_buffers):
            timm_state[name] = buffer
    out: dict[str, torch.Tensor] = {}
    for name, value in timm_state.items():
        value = value.detach().float().contiguous() if value.is_floating_point() else value.detach().contiguous()
        if block := _BLOCK.fullmatch(name):
            stage, index, rest = block.groups()
            where = f"{prefix}encoder.layers.{stage}.blocks.{index}."
            if _attention(family, where, rest, value, out):
                continue
            target = next((where + new + rest[len(old):] for old, new in family.block if rest.startswith(old)), None)
        elif down := _DOWNSAMPLE.fullmatch(name):  # timm: start of stage i; transformers: end of stage i - 1
            target = f"{prefix}encoder.layers.{int(down.group(1)) - 1}.downsample.{down.group(2)}"
        elif name.startswith("head.fc."):
            out[f"classifier.{name.removeprefix('head.fc.')}"] = value
            continue
        else:
            target = next((prefix + new + name[len(old):] for old, new in _STEM if name.startswith(old)), None)
        if target is None:
            raise ExportError(f"--format hf: no transformers name for timm's {name}")
        out[target] = value
    return {k: v.clone() for k, v in out.items()}  # own storage: chunks of qkv share it


def _architecture(exported: Exported) -> str:
    family = FAMILIES[exported.spec.is_v2]
    if exported.simmim is not None:
        return family.masked
    return family.classification if exported.num_classes else family.base


def _weights(exported: Exported, architecture: str) -> dict[str, torch.Tensor]:
    family = FAMILIES[exported.spec.is_v2]
    if architecture == family.base:  # the bare encoder: no prefix, no head
        return hf_state_dict(exported.model, exported.spec.is_v2, "")
    state = hf_state_dict(exported.model, exported.spec.is_v2, f"{family.prefix}.")
    if exported.simmim is not None:
        state[f"{family.prefix}.embeddings.mask_token"] = exported.simmim.mask_token.detach().float().reshape(1, 1, -1)
        for name, value in exported.simmim.decoder.state_dict().items():
            state[f"decoder.{name}"] = value.detach().float().clone()
    return state


def preprocessor_config(exported: Exported) -> dict[str, Any]:
    """An image processor with the run's evaluation preprocessing: the shorter side to
    size / crop_pct, a center crop of `size`, the run's mean and std (transformers' ConvNext
    processor does exactly this below 384 pixels; at 384 and above it resizes to size x size)."""
    return {"image_processor_type": "ConvNextImageProcessor", "do_resize": True,
            "size": {"shortest_edge": exported.img_size}, "crop_pct": exported.crop_pct,
            "resample": RESAMPLE[exported.interpolation], "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(exported.mean),
            "image_std": list(exported.std)}


def write(exported: Exported, out_dir: Path) -> list[str]:
    check_available()
    _check_supported(exported)
    architecture = _architecture(exported)
    hf_config(exported, architecture).save_pretrained(out_dir)
    save_file(_weights(exported, architecture), out_dir / "model.safetensors", metadata={"format": "pt"})
    (out_dir / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(exported), indent=2) + "\n")
    return FILES


def load(out_dir: Path) -> tuple[torch.nn.Module, dict[str, list[str]]]:
    """The export as transformers builds it from the directory alone, and what it reported missing."""
    check_available()
    transformers.logging.disable_progress_bar()  # one bar per load would bury the export's own lines
    config = transformers.AutoConfig.from_pretrained(out_dir)
    model_class = getattr(transformers, config.architectures[0])
    model, info = model_class.from_pretrained(out_dir, output_loading_info=True)
    return model.eval(), info


def outputs(model: torch.nn.Module, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """What the compared output of a transformers Swin is: logits, pooled features or the reconstruction."""
    if mask is not None:
        return model(pixel_values=images, bool_masked_pos=mask.flatten(1)).reconstruction
    result = model(pixel_values=images)
    return result.logits if hasattr(result, "logits") else result.pooler_output


def verify(exported: Exported, out_dir: Path) -> float:
    """transformers loads the directory with no missing or unexpected key and reproduces the outputs."""
    model, info = load(out_dir)
    problems = {kind: info.get(kind) for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(problems.values()):
        raise ExportError(f"{out_dir}: transformers loads the export with {problems}")
    x = exported.probe()
    with torch.no_grad():
        if exported.simmim is not None:
            mask = exported.probe_mask()
            return check_close("the hf export's reconstruction", exported.simmim(x, mask.float()),
                               outputs(model, x, mask), out_dir)
        ours = exported.model(x) if exported.num_classes else exported.model.forward_head(
            exported.model.forward_features(x), pre_logits=True)
        return check_close("the hf export's output", ours, outputs(model, x), out_dir)


# The Auto class that builds each architecture from the directory.
_AUTO = {"classification": "AutoModelForImageClassification", "base": "AutoModel",
         "masked": "AutoModelForMaskedImageModeling"}


def usage(exported: Exported, out_dir: str) -> str:
    family = FAMILIES[exported.spec.is_v2]
    kind = {family.classification: "classification", family.base: "base", family.masked: "masked"}
    auto = _AUTO[kind[_architecture(exported)]]
    return (f"from transformers import AutoImageProcessor, {auto}\n\n"
            f'processor = AutoImageProcessor.from_pretrained("{out_dir}")\n'
            f'model = {auto}.from_pretrained("{out_dir}")  # {_architecture(exported)}\n')
