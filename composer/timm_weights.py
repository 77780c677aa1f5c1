"""Pretrained weights from timm: `composer import WEIGHTS SPEC --out RUN_DIR`.

timm's VisionTransformer, MlpMixer, ConvMixer, ConvNeXt and SwinTransformer compute what
composer's vit, mixer, convmixer and convnext blocks compute (with downsample blocks between the
stages of ConvNeXt and Swin; the shipped specs vit_ti16/s16/b16, mixer_s16/b16,
convmixer_768_32/1536_20, convnext_tiny and swin_t have their parameter counts), so their
weights carry over tensor for tensor under other names. The import writes a run directory whose
best.pt holds them with the spec: `evaluate`, `predict`, `export` and `visualize` take it as
they take a trained run, and `train.init_from` fine-tunes from it (a new class count or image
size included).

Files: a state dict saved by torch (`.pth`, `.bin`, `.pt`; also one wrapped under "model",
"state_dict" or "state_dict_ema") or a `.safetensors` file, as timm and the Hugging Face hub
ship them. Read without executing code: torch.load(weights_only=True), and safetensors by its
header (no extra package).
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
import yaml

from composer.errors import UserError, first_few

# Each family's own key (how a file is recognized, first match wins: ConvNeXt's weights have
# ConvMixer's key too) and the block kinds of a spec it fits.
FAMILIES = {
    "swin": ("layers.0.blocks.0.attn.relative_position_bias_table", {"attention", "channel_mlp", "downsample"}),
    "vit": ("patch_embed.proj.weight", {"attention", "channel_mlp"}),
    "mixer": ("stem.proj.weight", {"token_mlp", "channel_mlp"}),
    "convnext": ("stages.0.blocks.0.conv_dw.weight", {"convnext", "downsample"}),
    "convmixer": ("stem.0.weight", {"dwconv", "pointwise"}),
}
# The normalization timm's default weights of each family were trained with (images in [0, 1]).
NORMALIZATION = {
    "inception": ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
    "imagenet": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    "clip": ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]),   # OpenAI's CLIP
}
FAMILY_NORMALIZATION = {"vit": "inception", "mixer": "inception", "convmixer": "imagenet", "convnext": "imagenet",
                        "swin": "imagenet"}

# composer module name within a layer of each kind -> timm's name ("{b}": the index of timm's block;
# ConvNeXt's: "{s}" its stage, "{j}" the block within the stage)
LAYER_NAMES = {
    "attention": {"norm": "blocks.{b}.norm1", "to_qkv": "blocks.{b}.attn.qkv", "to_out": "blocks.{b}.attn.proj",
                  "q_norm": "blocks.{b}.attn.q_norm", "k_norm": "blocks.{b}.attn.k_norm", "scale": "blocks.{b}.ls1"},
    "token_mlp": {"norm": "blocks.{b}.norm1", "mix_in": "blocks.{b}.mlp_tokens.fc1",
                  "mix_out": "blocks.{b}.mlp_tokens.fc2"},
    "channel_mlp": {"norm": "blocks.{b}.norm2", "mix_channels.0": "blocks.{b}.{mlp}.fc1",
                    "mix_channels.3": "blocks.{b}.{mlp}.fc2", "scale": "blocks.{b}.ls2"},
    "dwconv": {"conv": "blocks.{b}.0.fn.0", "norm": "blocks.{b}.0.fn.2"},
    "pointwise": {"mix_channels.0": "blocks.{b}.1", "mix_channels.2": "blocks.{b}.3"},
    "convnext": {"conv": "stages.{s}.blocks.{j}.conv_dw", "norm": "stages.{s}.blocks.{j}.norm",
                 "mix_channels.0": "stages.{s}.blocks.{j}.mlp.fc1", "mix_channels.2": "stages.{s}.blocks.{j}.mlp.fc2",
                 "scale": "stages.{s}.blocks.{j}"},   # scale.gamma -> stages.{s}.blocks.{j}.gamma
    "downsample": {"norm": "stages.{s}.downsample.0", "merge": "stages.{s}.downsample.1"},
    "cls_token": {"token": "cls_token", "dist_token": "dist_token"},
    "registers": {"tokens": "reg_token"},
    "pos_embed": {"pos": "pos_embed"},
    "norm_pre": {"norm": "norm_pre"},
    "head": {"norm": "norm", "classify": "head", "classify_dist": "head_dist",
             # attention pooling (MAP); its MLP first: the first entry that prefixes a name gives it
             "attend.mlp.0": "attn_pool.mlp.fc1", "attend.mlp.2": "attn_pool.mlp.fc2", "attend": "attn_pool"},
}
POOLED_HEAD_NORM = {"norm": "fc_norm"}   # a head whose LayerNorm follows the pooling (head.norm: pooled)
HEAD_NAMES = {"convnext": {"norm": "head.norm", "classify": "head.fc"},   # where a family's head differs
              "swin": {"norm": "norm", "classify": "head.fc"}}
# Swin's stages: "{s}" the stage, "{j}" the block within it (as ConvNeXt's)
SWIN_NAMES = {
    "attention": {"norm": "layers.{s}.blocks.{j}.norm1", "to_qkv": "layers.{s}.blocks.{j}.attn.qkv",
                  "to_out": "layers.{s}.blocks.{j}.attn.proj",
                  "relative.table": "layers.{s}.blocks.{j}.attn.relative_position_bias_table"},
    "channel_mlp": {"norm": "layers.{s}.blocks.{j}.norm2", "mix_channels.0": "layers.{s}.blocks.{j}.mlp.fc1",
                    "mix_channels.3": "layers.{s}.blocks.{j}.mlp.fc2"},
    "downsample": {"norm": "layers.{s}.downsample.norm", "merge": "layers.{s}.downsample.reduction"},
}
BLOCK_KINDS = ("attention", "token_mlp", "channel_mlp", "dwconv", "pointwise", "convnext", "downsample")
STEM_NAMES = {"vit": {"project": "patch_embed.proj"}, "mixer": {"project": "stem.proj"},
              "convmixer": {"project": "stem.0", "norm": "stem.2"}, "convnext": {"project": "stem.0", "norm": "stem.1"},
              "swin": {"project": "patch_embed.proj", "norm": "patch_embed.norm"}}
STARTS_BLOCK = ("attention", "token_mlp", "dwconv")   # the first half of a vit, mixer or convmixer block


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a torch-saved state dict or a safetensors file, with user-facing errors."""
    if not path.is_file():
        raise UserError(f"{path} does not exist; give a weights file (.safetensors, .pth, .bin)")
    try:
        if path.suffix == ".safetensors":
            return _read_safetensors(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"{path} cannot be read as weights ({type(exc).__name__}: {str(exc)[:200]}); give a "
                        "state dict saved by torch (.pth, .bin) or a .safetensors file") from None
    for wrapper in ("state_dict_ema", "model", "state_dict"):   # training checkpoints keep them under a key
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} holds no state dict (a mapping of names to tensors)")
    return state


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The format: an 8-byte little-endian header length, a JSON header of {name: {dtype, shape,
    data_offsets}}, then the tensors' bytes (little-endian, offsets relative to the data's start)."""
    data = bytearray(path.stat().st_size)   # read once into a writable buffer the tensors are cut from
    with open(path, "rb") as f:
        f.readinto(data)
    if len(data) < 8:
        raise UserError(f"{path} is too short to be a safetensors file")
    (length,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(data[8:8 + length])
    except ValueError:
        raise UserError(f"{path} is not a safetensors file (its header is not JSON)") from None
    body = 8 + length
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(entry.get("dtype"))
        start, end = entry["data_offsets"]
        if dtype is None or body + end > len(data):
            raise UserError(f"{path}: tensor {name} has an unsupported dtype {entry.get('dtype')} or lies past the "
                            "end of the file")
        count = (end - start) // dtype.itemsize
        flat = (torch.frombuffer(data, dtype=dtype, count=count, offset=body + start) if count
                else torch.empty(0, dtype=dtype))
        out[name] = flat.reshape(entry["shape"]).clone()   # its own memory, aligned
    return out


def family_of(weights: dict) -> str:
    for family, (key, _) in FAMILIES.items():
        if key in weights:
            return family
    shown = ", ".join(list(weights)[:6])
    raise UserError(f"the weights are not a timm ViT, MLP-Mixer, ConvMixer, ConvNeXt or Swin (none of "
                    f"{', '.join(key for key, _ in FAMILIES.values())} is in them; they start with {shown})")


def timm_names(model, family: str) -> dict[str, str]:
    """composer state-dict key -> timm's, for every tensor of `model`."""
    names, block, stage, in_stage = {}, -1, 0, -1
    mlp = "mlp" if family == "vit" else "mlp_channels"
    for i, layer in enumerate(model.layers):
        kind = layer.kind.split(" ")[0]   # "head (cls)" -> "head"
        if kind in STARTS_BLOCK or kind == "convnext":
            block, in_stage = block + 1, in_stage + 1
        elif kind == "downsample":   # ConvNeXt, Swin: the first layer of the next stage
            stage, in_stage = stage + 1, -1
        table = STEM_NAMES[family] if kind == "stem" else (SWIN_NAMES if family == "swin" else LAYER_NAMES).get(kind, {})
        if kind == "head":
            table = HEAD_NAMES.get(family, table)
        if kind == "head" and layer.layout == "tokens" and layer.module.norm_pooled:
            table = table | POOLED_HEAD_NORM
        for key in layer.module.state_dict():
            for ours, theirs in table.items():
                if key == ours or key.startswith(ours + "."):
                    names[f"stages.{i}.{key}"] = theirs.format(b=block, mlp=mlp, s=stage, j=in_stage) + key[len(ours):]
                    break
            else:
                names[f"stages.{i}.{key}"] = f"(no timm name for {layer.name}: {key})"
    return names


def fit_prefix_tokens(weights: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """timm's ViT position table in the layout of composer's: timm may leave the class token out of it
    (`no_embed_class`, DeiT III) or give the register tokens rows too. composer's table has a row
    for a class token that joins before the blocks and none for registers, so the first case gets a
    zero row (adding nothing, as timm adds nothing) and the second moves the registers' rows into
    the register tokens themselves (a constant added to a constant: the same sums). Other shapes are
    left for the shape check to report."""
    pos = weights.get("pos_embed")
    layers = {layer.kind.split(" ")[0]: layer.module for layer in model.layers}
    if pos is None or "pos_embed" not in layers or pos.dim() != 3:
        return weights
    ours = layers["pos_embed"].pos.shape[1]
    registers = layers["registers"].tokens.shape[1] if "registers" in layers else 0
    embedded_cls = ours - model.spec.grid ** 2   # 1: a class token has the table's first row (2: and DeiT's
    fitted = dict(weights)                       # distillation token the second)
    if embedded_cls and pos.shape[1] == ours - embedded_cls:
        fitted["pos_embed"] = torch.cat([torch.zeros_like(pos[:, :embedded_cls]), pos], dim=1)
    elif registers and pos.shape[1] == ours + registers and "reg_token" in weights:
        rows = pos[:, embedded_cls:embedded_cls + registers]
        fitted["pos_embed"] = torch.cat([pos[:, :embedded_cls], pos[:, embedded_cls + registers:]], dim=1)
        fitted["reg_token"] = weights["reg_token"] + rows.to(weights["reg_token"].dtype)
    return fitted


def spec_from_timm(model, name: str) -> dict:
    """The spec (as YAML data) of a timm VisionTransformer, MlpMixer or ConvMixer, read from its
    modules; a variant with parts composer does not build is refused, naming them."""
    kind = type(model).__name__
    if kind in ("VisionTransformer", "VisionTransformerDistilled"):   # the second: DeiT with its distillation token
        block = model.blocks[0]

        def present(module) -> bool:
            return module is not None and type(module).__name__ != "Identity"

        pool = {"token": "cls", "avg": "mean", "map": "attention"}.get(model.global_pool)
        has_cls = model.cls_token is not None
        attn_pool = getattr(model, "attn_pool", None)
        extra = [part for part, there in (
            (f"{model.global_pool or 'no'} pooling", pool is None),
            ("a class token its average-pooled head leaves out", pool == "mean" and has_cls),
            ("a class token beside attention pooling", pool == "attention" and has_cls),
            ("pooling over the class token and registers too (pool_include_prefix)",
             getattr(model, "pool_include_prefix", False) and model.num_prefix_tokens > 0),
            ("attention pooling other than one query, a projection, then a LayerNorm + GELU MLP",
             pool == "attention" and not _plain_attention_pool(attn_pool)),
            (f"{type(block).__name__} blocks", type(block).__name__ != "Block"),
            (f"a {type(block.mlp).__name__} MLP with {type(block.mlp.act).__name__}", type(block.mlp).__name__ != "Mlp"
             or _gelu(block.mlp.act) is None),
            ("a norm in the patch embedding", present(getattr(model.patch_embed, "norm", None))),
            ("a norm inside attention or the MLP", present(getattr(block.attn, "norm", None))
             or present(getattr(block.mlp, "norm", None)))) if there]
        if extra:
            raise UserError(f"timm's {name} is a ViT with {', '.join(extra)}: parts composer's vit blocks do not have")
        dim = model.embed_dim
        stem, size = {"patch_size": model.patch_embed.patch_size[0], "dim": dim}, model.patch_embed.img_size[0]
        if model.patch_embed.proj.bias is None:   # CLIP's
            stem["bias"] = False
        vit = {"kind": "vit", "heads": block.attn.num_heads, "mlp_ratio": block.mlp.fc1.out_features / dim,
               "qkv_bias": block.attn.qkv.bias is not None, "repeat": len(model.blocks)}
        if _gelu(block.mlp.act) != "gelu":
            vit["mlp_activation"] = _gelu(block.mlp.act)
        if block.norm1.eps != 1e-6:   # timm's ViTs mostly use 1e-6; CLIP's 1e-5
            vit["norm_eps"] = block.norm1.eps
        if present(block.attn.q_norm):
            vit["qk_norm"] = True
        if present(block.ls1):   # the trained factors come with the weights; this is where they started
            vit["layer_scale"] = float(getattr(block.ls1, "init_values", 1e-5))
        head_norm = "pooled" if present(model.fc_norm) else "layernorm" if present(model.norm) else "none"
        extras = {"pos_embed": "learned" if model.pos_embed is not None else "none",
                  "registers": model.reg_token.shape[1] if model.reg_token is not None else 0,
                  "head": {"pool": pool, "norm": head_norm}}
        head_norm_module = model.fc_norm if head_norm == "pooled" else model.norm
        if present(head_norm_module) and head_norm_module.eps != 1e-6:
            extras["head"]["norm_eps"] = head_norm_module.eps
        if present(getattr(model, "norm_pre", None)):   # CLIP's ln_pre
            extras.update(norm_pre=True, norm_pre_eps=model.norm_pre.eps)
        if pool == "attention":
            extras["head"].update(heads=attn_pool.num_heads, mlp_ratio=attn_pool.mlp.fc1.out_features / dim)
            if _gelu(attn_pool.mlp.act) == "gelu_tanh":
                extras["head"]["mlp_activation"] = "gelu_tanh"
        if kind == "VisionTransformerDistilled":
            extras["head"]["distill_token"] = True
        blocks = [vit]
    elif kind == "MlpMixer":
        block, dim = model.blocks[0], model.embed_dim
        stem, size = {"patch_size": model.stem.patch_size[0], "dim": dim}, model.stem.img_size[0]
        blocks = [{"kind": "mixer", "token_hidden": block.mlp_tokens.fc1.out_features,
                   "mlp_ratio": block.mlp_channels.fc1.out_features / dim, "repeat": len(model.blocks)}]
        extras = {"head": {"pool": "mean"}}
    elif kind == "ConvMixer":
        activation = "relu" if type(model.stem[1]).__name__ == "ReLU" else "gelu"
        stem = {"patch_size": model.stem[0].kernel_size[0], "dim": model.num_features, "activation": activation,
                "norm": "batchnorm"}
        size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))[-1]
        blocks = [{"kind": "convmixer", "kernel_size": model.blocks[0][0].fn[0].kernel_size[0],
                   "activation": activation, "repeat": len(model.blocks)}]
        extras = {"head": {"pool": "mean"}}
    elif kind == "SwinTransformer":
        stem, blocks = _swin_spec(model, name)
        size = model.patch_embed.img_size[0]
        extras = {"pos_embed": "relative", "head": {"pool": "mean", "norm": "layernorm", "norm_eps": model.norm.eps}}
    elif kind == "ConvNeXt":
        stem, blocks = _convnext_spec(model, name)
        size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))[-1]
        extras = {"head": {"pool": "mean", "norm": "layernorm"}}   # on the grid: the norm of the pooled vector
    else:
        raise UserError(f"timm's {name} is a {kind}; composer imports VisionTransformer, MlpMixer, ConvMixer, "
                        "ConvNeXt and SwinTransformer models")
    return {"name": name.replace(".", "_"), "description": f"timm's {name}, imported",
            # a backbone (num_classes 0) gets one class: its classifier is not used (import: backbone_only)
            "model": {"image_size": size, "num_classes": max(1, model.num_classes), "stem": stem, **extras,
                      "blocks": blocks},
            "data": {"kind": "folder", "root": "data/train"}}


def _plain_attention_pool(pool) -> bool:
    """Whether timm's AttentionPoolLatent is the one composer builds (head.pool: attention): one
    latent query through a projection, no position table or qk-norm of its own, the projection
    out and a LayerNorm + GELU MLP with its residual, the first (only) query's output."""
    return (pool is not None and pool.latent_len == 1 and pool.pos_embed is None and pool.pool == "token"
            and _class_name(pool.q) == "Linear" and _class_name(pool.q_norm) == "Identity"
            and getattr(pool, "mlp", None) is not None and _gelu(pool.mlp.act) in ("gelu", "gelu_tanh")
            and _class_name(pool.norm) == "LayerNorm"
            and pool.kv.bias is not None and pool.q.bias is not None)


def _gelu(act) -> str | None:
    """ "gelu", "gelu_tanh" or "quick_gelu" for timm's GELU modules (exact; the tanh approximation:
    timm's GELUTanh, or nn.GELU(approximate="tanh"); CLIP's QuickGELU); None for any other activation."""
    if _class_name(act) == "GELU":
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(getattr(act, "approximate", "none"))
    return {"GELUTanh": "gelu_tanh", "QuickGELU": "quick_gelu"}.get(_class_name(act))


def _class_name(module) -> str:
    """A timm module's class name: how its parts are told apart (without importing timm here)."""
    return type(module).__name__


def _convnext_spec(model, name: str) -> tuple[dict, list[dict]]:
    """The stem and blocks of a timm ConvNeXt: a downsample block before each stage but the first,
    then the stage's convnext blocks. Variants with parts composer does not build are refused."""
    def is_patchify(conv) -> bool:   # kernel = stride, no padding: non-overlapping patches
        return _class_name(conv) == "Conv2d" and conv.kernel_size == conv.stride and conv.padding == (0, 0) \
            and conv.kernel_size[0] == conv.kernel_size[1]

    first = model.stages[0].blocks[0]
    extra = [part for part, there in (
        ("an overlapping stem", not (len(model.stem) == 2 and is_patchify(model.stem[0]))),
        (f"{_class_name(model.stem[-1])} norms", _class_name(model.stem[-1]) != "LayerNorm2d"
         or _class_name(first.norm) not in ("LayerNorm", "LayerNorm2d")),
        ("a downsampling first stage", _class_name(model.stages[0].downsample) != "Identity"),
        ("a norm before the head (head_norm_first)", _class_name(model.norm_pre) != "Identity"),
        ("a hidden layer in the head",
         _class_name(getattr(model.head, "pre_logits", None)) not in ("Identity", "NoneType")),
        (f"{_class_name(first)} blocks", _class_name(first) != "ConvNeXtBlock"),
        (f"a {_class_name(first.mlp)} MLP", _class_name(first.mlp) != "Mlp" or _class_name(first.mlp.act) != "GELU"
         or _class_name(first.mlp.norm) != "Identity"),
        ("a shortcut with weights", _class_name(first.shortcut) != "Identity"),
        ("dilated convolutions", first.conv_dw.dilation != (1, 1))) if there]
    if extra:
        raise UserError(f"timm's {name} is a ConvNeXt with {', '.join(extra)}: parts composer's convnext blocks do not "
                        "have")
    stem = {"patch_size": model.stem[0].kernel_size[0], "dim": model.stem[0].out_channels, "norm": "layernorm"}
    blocks = []
    for s, stage in enumerate(model.stages):
        if s > 0:
            merge = stage.downsample[1] if _class_name(stage.downsample) == "Sequential" else None
            if merge is None or _class_name(stage.downsample[0]) != "LayerNorm2d" or not is_patchify(merge):
                raise UserError(f"timm's {name} downsamples its stage {s} with {stage.downsample}, not a "
                                "LayerNorm and a patchifying convolution")
            blocks.append({"kind": "downsample", "dim": merge.out_channels, "factor": merge.kernel_size[0]})
        block = stage.blocks[0]
        fc1 = block.mlp.fc1
        hidden = fc1.out_features if _class_name(fc1) == "Linear" else fc1.out_channels
        blocks.append({"kind": "convnext", "kernel_size": block.conv_dw.kernel_size[0],
                       "mlp_ratio": hidden / block.conv_dw.out_channels,
                       # the trained factors come with the weights; this is where timm starts them
                       "layer_scale": 1e-6 if block.gamma is not None else None, "repeat": len(stage.blocks)})
    return stem, blocks


def _swin_spec(model, name: str) -> tuple[dict, list[dict]]:
    """The stem and blocks of a timm SwinTransformer: before each stage but the first a downsample
    block (patch merging), then the stage's vit blocks with their windows, shifted in every second
    block. Variants with parts composer does not build are refused."""
    first = model.layers[0].blocks[0]
    extra = [part for part, there in (
        ("an absolute position embedding", getattr(model, "absolute_pos_embed", None) is not None),
        ("a patch embedding without its LayerNorm", _class_name(model.patch_embed.norm) != "LayerNorm"),
        (f"a {_class_name(first.mlp)} MLP", _class_name(first.mlp) != "Mlp" or _class_name(first.mlp.act) != "GELU"),
        ("windows that are not square", first.window_size[0] != first.window_size[1]),
        (f"a {_class_name(model.head.global_pool)} head",
         getattr(model.head.global_pool, "pool_type", "avg") != "avg")) if there]
    if extra:
        raise UserError(f"timm's {name} is a Swin with {', '.join(extra)}: parts composer's blocks do not have")
    proj = model.patch_embed.proj
    stem = {"patch_size": proj.kernel_size[0], "dim": proj.out_channels, "norm": "layernorm",
            "norm_eps": model.patch_embed.norm.eps}
    blocks = []
    for s, stage in enumerate(model.layers):
        if s > 0:
            merge = stage.downsample
            if _class_name(merge) != "PatchMerging":
                raise UserError(f"timm's {name} downsamples its stage {s} with {_class_name(merge)}, not patch merging")
            blocks.append({"kind": "downsample", "dim": merge.reduction.out_features, "style": "merge",
                           "norm_eps": merge.norm.eps})
        block, window = stage.blocks[0], stage.blocks[0].window_size[0]
        shifts = [b.shift_size[0] if isinstance(b.shift_size, tuple) else b.shift_size for b in stage.blocks]
        if shifts != [window // 2 * (i % 2) for i in range(len(shifts))] and any(shifts):
            raise UserError(f"timm's {name} shifts the windows of stage {s} by {shifts}; composer shifts every "
                            "second block by half a window")
        vit = {"kind": "vit", "heads": block.attn.num_heads,
               "mlp_ratio": block.mlp.fc1.out_features / block.norm1.normalized_shape[0],
               "qkv_bias": block.attn.qkv.bias is not None, "norm_eps": block.norm1.eps, "window": window,
               "repeat": len(stage.blocks)}
        if any(shifts):
            vit["shift"] = True
        blocks.append(vit)
    return stem, blocks


def _from_timm(name: str):
    """timm's model `name` with its pretrained weights (timm downloads them, or finds them cached)."""
    try:
        import timm
    except ImportError:
        raise UserError(f"timm:{name} needs timm (pip install timm); or give a weights file") from None
    try:
        return timm.create_model(name, pretrained=True).eval()
    except Exception as exc:
        raise UserError(f"timm could not make {name} with its pretrained weights ({type(exc).__name__}: "
                        f"{str(exc)[:200]}); check the name (timm.list_pretrained()) and the network, or give a "
                        "weights file") from None


def import_timm(weights_path: str | Path, spec_path: str | Path | None, out: str | Path, overrides: list[str] = (),
                normalization: str | None = None, classes_file: str | Path | None = None, force: bool = False) -> dict:
    """Write `out`/best.pt (and spec.yaml) from timm weights for the model `spec_path` describes.
    `weights_path` "timm:NAME" takes timm's pretrained model of that name (and, without a spec, its
    architecture and normalization). Returns what was done, for the command to print."""
    from composer.build import build_model
    from composer.checkpoint import BEST, library_versions, save_atomic
    from composer.spec import load_spec, load_spec_text
    from composer.train import spec_yaml

    out, source = Path(out), str(weights_path)
    if (out / BEST).exists() and not force:
        raise UserError(f"{out} already holds a checkpoint ({out / BEST}); choose another --out, or pass --force to "
                        "replace it (nothing was overwritten)")
    trained_with, read_from_timm = None, spec_path is None and source.startswith("timm:")
    if source.startswith("timm:"):
        reference = _from_timm(source[len("timm:"):])
        weights = {k: v.detach() for k, v in reference.state_dict().items()}
        cfg = getattr(reference, "pretrained_cfg", None) or {}   # what timm.create_model attaches
        if cfg.get("mean") and cfg.get("std"):
            trained_with = ([float(v) for v in cfg["mean"]], [float(v) for v in cfg["std"]])
        if spec_path is None:
            derived = spec_from_timm(reference, source[len("timm:"):])
            if 0 < (cfg.get("crop_pct") or 1.0) < 1.0:   # its evaluation's centre crop, for evaluate and predict
                derived["data"]["crop"] = float(cfg["crop_pct"])
            text = yaml.safe_dump(derived, sort_keys=False)
            spec_path = f"{source} (its spec)"
            spec = load_spec_text(text, spec_path, list(overrides))
        else:
            spec = load_spec(spec_path, list(overrides))
    else:
        if spec_path is None:
            raise UserError(f"a weights file needs the SPEC of its model (e.g. specs/vit_s16.yaml); timm:NAME "
                            "derives the spec from timm's model")
        spec = load_spec(spec_path, list(overrides))
        weights = read_weights(Path(source))
    if spec.model.in_channels != 3:
        raise UserError(f"timm's weights take RGB images; {spec_path} has in_channels {spec.model.in_channels}")
    family = family_of(weights)
    model = build_model(spec, backend="reference")
    kinds = {layer.kind for layer in model.layers if layer.kind in BLOCK_KINDS}
    allowed = FAMILIES[family][1]
    if not kinds <= allowed:
        example = {"vit": "vit_s16", "mixer": "mixer_s16", "convmixer": "convmixer_768_32",
                   "convnext": "convnext_tiny", "swin": "swin_t"}[family]
        raise UserError(f"{source} holds a timm {family}, but {spec_path} has {', '.join(sorted(kinds - allowed))} "
                        f"blocks; give a spec of {family} blocks (e.g. specs/{example}.yaml)")
    names = timm_names(model, family)
    if family == "vit":
        weights = fit_prefix_tokens(weights, model)
    # A backbone (timm's num_classes=0, as DINOv2's): no classifier in the weights; the run keeps
    # a random one and says so, and fine-tuning from it starts a new one
    # stages.{i}.classify.weight (and DeiT's second classifier, classify_dist)
    classifier = {ours for ours in names if ours.split(".")[2] in ("classify", "classify_dist")}
    backbone_only = bool(classifier) and not any(names[ours] in weights for ours in classifier)
    state, problems = model.state_dict(), []
    for ours, theirs in names.items():
        given = weights.get(theirs)
        if backbone_only and ours in classifier:
            continue
        if given is not None and given.dim() == 4 and given.shape[2:] == (1, 1) and given.shape[:2] == state[ours].shape:
            given = given[:, :, 0, 0]   # a 1x1 convolution's weight for a Linear's (ConvNeXt's conv_mlp variants)
        if given is None:
            problems.append(f"{theirs} (for {ours}): not in the weights")
        elif given.shape != state[ours].shape:
            problems.append(f"{theirs}: weights {tuple(given.shape)}, spec's model {tuple(state[ours].shape)}")
        else:
            state[ours] = given.to(state[ours].dtype)
    used = set(names.values())
    problems += [f"{key} {tuple(value.shape)}: not in the spec's model" for key, value in weights.items()
                 if key not in used]
    if problems:
        raise UserError(f"{source} does not fit the model of {spec_path}:\n  " + first_few(problems, 12, "\n  ")
                        + "\nThe spec must describe the same network: dim, depth, heads, token and channel MLP "
                        "widths, patch size, image size (for the position embedding), class count, and the parts "
                        "some variants add: layer_scale, qk_norm, registers, head pool and norm")
    model.load_state_dict(state)

    if normalization or trained_with is None:
        chosen = normalization or FAMILY_NORMALIZATION[family]
        mean, std = NORMALIZATION[chosen]
    else:   # the pretrained weights' own, from timm's configuration
        chosen, (mean, std) = "timm's configuration of the weights", trained_with
    classes = _classes(classes_file, spec.model.num_classes)
    out.mkdir(parents=True, exist_ok=True)
    text = spec_yaml(spec)
    save_atomic({"model": model.state_dict(), "spec_yaml": text, "epoch": 0,
                 "normalization": {"mean": mean, "std": std}, "classes": classes, "versions": library_versions(),
                 "imported_from": source, "backbone_only": backbone_only}, out / BEST)
    (out / "spec.yaml").write_text(text)
    given = len(names) - (len(classifier) if backbone_only else 0)
    return {"path": str(out / BEST), "out": str(out), "family": family, "tensors": given, "backbone_only": backbone_only,
            "normalization": chosen, "normalization_given": normalization is not None or trained_with is not None,
            "spec": spec, "spec_read_from_timm": read_from_timm, "mean": mean, "std": std,
            "classes": spec.model.num_classes, "named_classes": classes is not None}


def render(result: dict) -> str:
    """What `composer import` did, and what to do next."""
    r, m = result, result["spec"].model
    lines = [f"wrote {r['path']}: timm {r['family']}, {r['tensors']} tensors, all of them; inputs normalized with "
             f"mean {tuple(r['mean'])} and std {tuple(r['std'])} ({r['normalization']}"
             + ("" if r["normalization_given"] else ", timm's default for the family: --normalization to change it")
             + ")" + ("" if r["backbone_only"] else f"; {r['classes']} classes"
                      + ("" if r["named_classes"] else ", unnamed (evaluate takes the data's class names in order; "
                                                       "--classes FILE names them)"))]
    if r["spec_read_from_timm"]:
        lines.append(f"the spec, read from timm's model: {r['out']}/spec.yaml ({m.blocks[0].kind} x"
                     f"{m.blocks[0].repeat}, dim {m.stem.dim}, {m.image_size}x{m.image_size} input)")
    if r["backbone_only"]:
        lines.append(f"the weights have no classifier (a backbone): evaluate, predict and export refuse the run; "
                     f"fine-tune from it: composer train YOUR_SPEC.yaml --set train.init_from={r['out']} (add --set "
                     "train.freeze=backbone for a linear probe); composer visualize attention shows its maps")
    else:
        lines.append(f"next: composer evaluate {r['out']} --data-root DIR; or fine-tune: composer train YOUR_SPEC.yaml "
                     f"--set train.init_from={r['out']}")
    return "\n".join(lines)


def _classes(classes_file, count: int) -> list[str] | None:
    """The class names of the file; None without one (evaluate then takes the data's names, by position)."""
    if classes_file is None:
        return None
    path = Path(classes_file)
    try:
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except OSError as exc:
        raise UserError(f"cannot read the class names in {path}: {exc.strerror or exc}") from None
    if len(names) != count:
        raise UserError(f"{path} names {len(names)} classes, but the model has {count}; give one name a line, in "
                        "the order of the classifier's outputs")
    return names
