"""OpenAI CLIP ResNets (RN50, RN101, RN50x4, RN50x16, RN50x64) in pure torch, built from a state dict.

HF ``transformers`` has no CLIP ResNet, and ``open_clip`` / ``torchvision`` do not import here, so this module
re-implements the two towers with OpenAI's parameter names (a state dict of OpenAI's ``clip/model.py`` loads
with ``strict=True``):

- image: the modified ResNet (3-conv stem + 2x2 average pool; Bottlenecks whose stride is an average pool
  after the 3x3 conv, and whose shortcut is average pool + 1x1 conv + BN; an attention pool over the layer-4
  map with the mean token as query and a learned positional embedding, ``heads = width * 32 // 64`` as
  OpenAI sets it);
- text: token + positional embedding, causal pre-LN residual attention blocks with QuickGELU, ``ln_final``,
  ``text_projection``, ``logit_scale``.

The architecture (layers per stage, width, embed dim, resolution from the attention pool's positional
embedding, context length, vocabulary, text width/heads/layers) is read from the tensors, exactly as OpenAI's
``build_model`` does; every parameter must then be present with the expected shape before anything is copied,
so a wrong file raises :class:`OpenAIClipError` (naming the file and the first offending key), never a
half-loaded model.

TaI-DPT's features (:meth:`OpenAIClip.encode_image`): global = the attention pool's output (its positional
embedding optional: TaI-DPT's trainer drops it); dense = the value path of the attention pool applied to every
layer-4 position (``c_proj(v_proj(x))``, no positional embedding, no attention); text = the EOT token after
``ln_final`` and ``text_projection`` (EOT = argmax of the token id, OpenAI's rule, or the first EOS).

Files (:func:`read_state_dict`): ``.safetensors``; ``.bin`` / ``.pt`` / ``.pth`` written by ``torch.save``
(read with ``torch.load(weights_only=True)``), optionally wrapped in ``{"state_dict": ...}`` and/or with
every key prefixed ``module.``; and OpenAI's released ``RN50.pt`` etc.

Safety decision for OpenAI's ``.pt`` files: they are TorchScript archives (a zip with ``code/`` = TorchScript
source, ``data.pkl`` = the pickled module tree, ``data/<n>`` = raw tensor storages). ``torch.jit.load``
compiles ``code/`` and, while unpickling, calls any ``__setstate__`` that code defines, i.e. it runs code from
the file at load time (which is why ``torch.load(weights_only=True)`` refuses TorchScript archives since torch
2.6: pytorch/pytorch#143326, the fix of CVE-2025-32434). We never call it. :func:`read_torchscript_state_dict`
opens the zip and unpickles ``data.pkl`` with a restricted unpickler: module classes (``__torch__.*``) become
inert records whose attribute dict is stored (no ``__setstate__`` of the file is looked up; ``code/`` is
never read), tensors are rebuilt from the raw storage bytes by our own function, and every other global
(anything callable besides ``collections.OrderedDict``) is refused. Nothing from the file is executed, so
reading is as safe as ``torch.load(weights_only=True)``. An archive that needs anything else is refused with
the one-line conversion to run once on a trusted file (docs/openai_resnets.md says more)::

  python -c "import torch; torch.save(torch.jit.load('RN50.pt', map_location='cpu').state_dict(), 'RN50.bin')"
"""

from __future__ import annotations

import pickle
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dbtr.utils.errors import UserError

# OpenAI's published ResNet layouts: blocks per stage, stem width, embed dim, image resolution, text width.
KNOWN_LAYOUTS: dict[str, tuple[tuple[int, int, int, int], int, int, int, int]] = {
    "RN50": ((3, 4, 6, 3), 64, 1024, 224, 512),
    "RN101": ((3, 4, 23, 3), 64, 512, 224, 512),
    "RN50x4": ((4, 6, 10, 6), 80, 640, 288, 640),
    "RN50x16": ((6, 8, 18, 8), 96, 768, 384, 768),
    "RN50x64": ((3, 15, 36, 10), 128, 1024, 448, 1024),
}
# Scalars OpenAI's archives carry beside the weights (its build_model deletes them before loading).
_META_KEYS = ("input_resolution", "context_length", "vocab_size")
CONVERT_COMMAND = (
    "python -c \"import torch; torch.save(torch.jit.load('RN50.pt', map_location='cpu').state_dict(), "
    "'RN50.bin')\""
)


class OpenAIClipError(UserError):
    """An OpenAI / open_clip ResNet CLIP file that cannot be read or does not fit the architecture."""


# ---------------------------------------------------------------------------------------------- architecture
@dataclass(frozen=True)
class OpenAIClipConfig:
    vision_layers: tuple[int, int, int, int]
    vision_width: int
    embed_dim: int
    image_resolution: int
    context_length: int
    vocab_size: int
    text_width: int
    text_layers: int

    @property
    def vision_heads(self) -> int:
        return self.vision_width * 32 // 64  # OpenAI's rule: 64-dim heads over the width*32 feature map

    @property
    def text_heads(self) -> int:
        return self.text_width // 64

    @property
    def name(self) -> str:
        """The published layout this config is (``RN50``, ...), or ``custom``."""
        for name, (layers, width, embed, res, text_width) in KNOWN_LAYOUTS.items():
            if (
                self.vision_layers,
                self.vision_width,
                self.embed_dim,
                self.image_resolution,
                self.text_width,
            ) == (
                layers,
                width,
                embed,
                res,
                text_width,
            ):
                return name
        return "custom"


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> (avg pool if strided) -> 1x1 x4; shortcut = avg pool + 1x1 conv + BN if shapes change."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        out = planes * self.expansion
        self.stride = stride
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.downsample = None
        if stride > 1 or inplanes != out:
            # OpenAI's Sequential also holds the (parameter-free) pool as "-1"; we pool in forward.
            self.downsample = nn.Sequential(
                OrderedDict([("0", nn.Conv2d(inplanes, out, 1, bias=False)), ("1", nn.BatchNorm2d(out))])
            )

    def _pool(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(x, self.stride) if self.stride > 1 else x

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self._pool(F.relu(self.bn2(self.conv2(y))))
        y = self.bn3(self.conv3(y))
        shortcut = x if self.downsample is None else self.downsample(self._pool(x))
        return F.relu(y + shortcut)


class AttentionPool2d(nn.Module):
    """Multi-head attention of the mean token (query) over [mean; positions] of the layer-4 map."""

    def __init__(self, grid: int, width: int, heads: int, output_dim: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.zeros(grid * grid + 1, width))
        self.k_proj = nn.Linear(width, width)
        self.q_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.c_proj = nn.Linear(width, output_dim)
        self.num_heads = heads
        self.grid = grid

    def _positions(self, h: int, w: int) -> Tensor:
        """(1 + h*w, C): the learned table, bicubically resized when the map is not the trained grid."""
        pos = self.positional_embedding
        if (h, w) == (self.grid, self.grid):
            return pos
        grid = pos[1:].reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=(h, w), mode="bicubic", align_corners=False).to(pos.dtype)
        return torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(h * w, -1)])

    @staticmethod
    def tokens(x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, H*W, C) in row-major position order."""
        return x.flatten(2).transpose(1, 2)

    def forward(self, x: Tensor, positional: bool = True) -> Tensor:
        """Pooled (B, output_dim): the mean token's attention output, as OpenAI's ``x[0]``."""
        tokens = self.tokens(x)
        seq = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)
        if positional:
            seq = seq + self._positions(*x.shape[-2:]).to(seq.dtype)
        b, n, c = seq.shape
        d = c // self.num_heads
        q = self.q_proj(seq[:, :1]).view(b, 1, self.num_heads, d).transpose(1, 2)
        k = self.k_proj(seq).view(b, n, self.num_heads, d).transpose(1, 2)
        v = self.v_proj(seq).view(b, n, self.num_heads, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, 1, d); scale 1/sqrt(d) as OpenAI
        return self.c_proj(out.transpose(1, 2).reshape(b, c))

    def values(self, x: Tensor) -> Tensor:
        """Dense (B, H*W, output_dim): each position's value through the output projection (TaI-DPT)."""
        return self.c_proj(self.v_proj(self.tokens(x)))


class ModifiedResNet(nn.Module):
    def __init__(self, cfg: OpenAIClipConfig):
        super().__init__()
        width = cfg.vision_width
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        inplanes = width
        for i, blocks in enumerate(cfg.vision_layers):
            planes = width * 2**i
            stage = [Bottleneck(inplanes, planes, stride=1 if i == 0 else 2)]
            inplanes = planes * Bottleneck.expansion
            stage += [Bottleneck(inplanes, planes) for _ in range(1, blocks)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
        self.attnpool = AttentionPool2d(
            cfg.image_resolution // 32, width * 32, cfg.vision_heads, cfg.embed_dim
        )

    def trunk(self, x: Tensor) -> Tensor:
        """Stem and the four stages: the layer-4 map (B, width*32, H/32, W/32)."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.avg_pool2d(F.relu(self.bn3(self.conv3(x))), 2)
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return x

    def forward(self, x: Tensor, positional: bool = True) -> Tensor:
        return self.attnpool(self.trunk(x), positional=positional)


class QuickGELU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class SelfAttention(nn.Module):
    """``nn.MultiheadAttention``'s parameter layout (packed q/k/v), causal, batch first."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.in_proj_weight = nn.Parameter(torch.zeros(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        self.num_heads = heads

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.view(b, n, self.num_heads, c // self.num_heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = SelfAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(width, width * 4)),
                    ("gelu", QuickGELU()),
                    ("c_proj", nn.Linear(width * 4, width)),
                ]
            )
        )
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x: Tensor) -> Tensor:
        return self.resblocks(x)


class OpenAIClip(nn.Module):
    """OpenAI's ResNet CLIP with OpenAI's parameter names; features as TaI-DPT uses them (see the module)."""

    def __init__(self, cfg: OpenAIClipConfig):
        super().__init__()
        self.config = cfg
        self.visual = ModifiedResNet(cfg)
        self.transformer = Transformer(cfg.text_width, cfg.text_layers, cfg.text_heads)
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.text_width)
        self.positional_embedding = nn.Parameter(torch.zeros(cfg.context_length, cfg.text_width))
        self.ln_final = nn.LayerNorm(cfg.text_width)
        self.text_projection = nn.Parameter(torch.zeros(cfg.text_width, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.zeros([]))

    # ------------------------------------------------------------------ image
    def encode_image(self, pixel_values: Tensor, positional: bool = True) -> tuple[Tensor, Tensor]:
        """(global (B, D), dense (B, H*W, D)) from one pass of the trunk; unnormalised.

        ``positional=False`` drops the attention pool's positional embedding from the global feature
        (TaI-DPT's trainer); the dense feature never uses it."""
        pool = self.visual.attnpool
        fmap = self.visual.trunk(pixel_values.to(self.visual.conv1.weight.dtype))
        return pool(fmap, positional=positional), pool.values(fmap)

    # ------------------------------------------------------------------- text
    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        return self.token_embedding(input_ids)

    def text_hidden(self, inputs_embeds: Tensor) -> Tensor:
        """ln_final of the transformer output (B, L, W) for input embeddings (B, L, W), L <= context."""
        x = inputs_embeds + self.positional_embedding[: inputs_embeds.shape[1]].to(inputs_embeds.dtype)
        return self.ln_final(self.transformer(x))

    def project_text(self, hidden: Tensor) -> Tensor:
        return hidden @ self.text_projection

    def encode_text(self, input_ids: Tensor, eot: str = "argmax") -> Tensor:
        """EOT features (B, D), unnormalised; ``eot``: ``argmax`` (OpenAI: highest id) or ``first_eos``."""
        hidden = self.text_hidden(self.embed_tokens(input_ids))
        index = eot_positions(input_ids, eot, self.config.vocab_size - 1)
        return self.project_text(hidden[torch.arange(hidden.shape[0], device=hidden.device), index])


def eot_positions(input_ids: Tensor, rule: str = "argmax", eot_id: int = 49407) -> Tensor:
    """The EOT position of each sequence: OpenAI's argmax of the id (EOT is the largest id, padding is 0), or
    the first ``eot_id`` (for tokenizers that pad with EOT)."""
    if rule == "argmax":
        return input_ids.argmax(dim=-1)
    if rule == "first_eos":
        return (input_ids == eot_id).int().argmax(dim=-1)
    raise ValueError(f"eot rule must be 'argmax' or 'first_eos', got {rule!r}")


# ------------------------------------------------------------------------------------------- reading files
class _Record:
    """An inert stand-in for a TorchScript module object: it keeps the attribute dict, runs nothing."""

    def __init__(self, qualname: str):
        self.qualname = qualname
        self.attrs: dict = {}

    def __setstate__(self, state) -> None:
        if isinstance(state, dict):
            self.attrs = state


def _record_class(qualname: str) -> type:
    # NEWOBJ calls cls.__new__(cls), BUILD calls inst.__setstate__: both are ours.
    return type("_TorchScriptObject", (_Record,), {"__new__": lambda cls: _Record(qualname)})


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


def _rebuild_tensor(
    storage: Tensor, offset: int, size, stride, requires_grad=False, hooks=None, *_
) -> Tensor:
    return storage.as_strided(tuple(size), tuple(stride), offset)


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, zf: zipfile.ZipFile, prefix: str, source: str):
        super().__init__(file)
        self.zf, self.prefix, self.source = zf, prefix, source

    def find_class(self, module: str, name: str):
        if module.startswith("__torch__"):
            return _record_class(f"{module}.{name}")
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        raise OpenAIClipError(
            f"{self.source} is a TorchScript archive whose data.pkl needs {module}.{name}, which dbtr does "
            f"not allow (reading it would mean running code from the file); if you trust the file, convert "
            f"it once to a plain state dict and pass that instead: {CONVERT_COMMAND}"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise OpenAIClipError(f"{self.source}: unexpected persistent id {pid!r} in data.pkl")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise OpenAIClipError(f"{self.source}: storage {key!r} in data.pkl has no known dtype")
        raw = bytearray(self.zf.read(f"{self.prefix}/data/{key}"))
        flat = (
            torch.frombuffer(raw, dtype=storage_type.dtype)
            if raw
            else torch.empty(0, dtype=storage_type.dtype)
        )
        return flat[:numel]


def is_torchscript_archive(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(
            n.endswith("/constants.pkl") or n.split("/", 1)[-1].startswith("code/") for n in zf.namelist()
        )


def read_torchscript_state_dict(path: Path) -> dict[str, Tensor]:
    """The parameters and buffers of a TorchScript archive, without executing anything from it."""
    source = str(path)
    with zipfile.ZipFile(path) as zf:
        pickles = [n for n in zf.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise OpenAIClipError(
                f"{source} is a zip without one top-level <name>/data.pkl: not a torch archive"
            )
        prefix = pickles[0].split("/")[0]
        with zf.open(pickles[0]) as f:
            try:
                root = _RestrictedUnpickler(f, zf, prefix, source).load()
            except OpenAIClipError:
                raise
            except (pickle.UnpicklingError, EOFError, KeyError, RuntimeError, ValueError, TypeError) as err:
                raise OpenAIClipError(
                    f"{source}: damaged TorchScript archive ({type(err).__name__}: {err})"
                ) from None
    if not isinstance(root, _Record):
        raise OpenAIClipError(f"{source}: data.pkl does not hold a TorchScript module")
    out: dict[str, Tensor] = {}

    def walk(rec: _Record, prefix: str) -> None:
        for name, value in rec.attrs.items():
            if isinstance(value, Tensor):
                out[prefix + name] = value
            elif isinstance(value, _Record):
                walk(value, f"{prefix}{name}.")

    walk(root, "")
    return out


def _unwrap(obj, source: str) -> dict[str, Tensor]:
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise OpenAIClipError(
            f"{source} does not hold a state dict (a mapping of parameter names to tensors)"
        )
    keys = list(obj)
    if all(isinstance(k, str) and k.startswith("module.") for k in keys):  # saved from DataParallel / DDP
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    for key, value in obj.items():
        if not isinstance(value, Tensor):
            raise OpenAIClipError(f"{source}: entry {key!r} is a {type(value).__name__}, not a tensor")
    return dict(obj)


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a ``.safetensors``, ``torch.save`` or OpenAI TorchScript file; never runs its code."""
    path = Path(path).expanduser()
    source = str(path)
    if not path.is_file():
        raise OpenAIClipError(
            f"no CLIP weights file at {source}: pass clip.name_or_path=<RN50.pt, a .bin or .safetensors>"
        )
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return _unwrap(load_file(str(path)), source)
        except SafetensorError as err:
            raise OpenAIClipError(f"{source}: damaged safetensors file ({err})") from None
    if is_torchscript_archive(path):
        return read_torchscript_state_dict(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise OpenAIClipError(
            f"{source} cannot be read as a weights-only torch file ({type(err).__name__}: {first}); pass an "
            f"OpenAI .pt, a state dict saved by torch.save, or a .safetensors file"
        ) from None
    return _unwrap(obj, source)


# ---------------------------------------------------------------------------------------- state dict -> model
def _need(sd: Mapping[str, Tensor], key: str, source: str, ndim: int) -> Tensor:
    if key not in sd:
        raise OpenAIClipError(
            f"{source} is not an OpenAI/open_clip ResNet CLIP state dict: it lacks {key!r}"
            + (
                " (it holds visual.proj: a ViT CLIP, use an HF CLIP folder for ViTs)"
                if "visual.proj" in sd
                else ""
            )
        )
    t = sd[key]
    if t.ndim != ndim:
        raise OpenAIClipError(f"{source}: {key!r} has shape {tuple(t.shape)}, expected {ndim} dimensions")
    return t


def config_from_state_dict(sd: Mapping[str, Tensor], source: str = "the state dict") -> OpenAIClipConfig:
    """OpenAI's ``build_model`` inference, with a named key in every failure."""
    layers = []
    for stage in range(1, 5):
        blocks = {k.split(".")[2] for k in sd if k.startswith(f"visual.layer{stage}.")}
        if not blocks:
            _need(sd, f"visual.layer{stage}.0.conv1.weight", source, 4)
        layers.append(len(blocks))
    width = int(_need(sd, "visual.layer1.0.conv1.weight", source, 4).shape[0])
    pos_key = "visual.attnpool.positional_embedding"
    rows = int(_need(sd, pos_key, source, 2).shape[0])
    grid = round((rows - 1) ** 0.5)
    if grid * grid + 1 != rows:
        raise OpenAIClipError(f"{source}: {pos_key!r} has {rows} rows, not a square grid plus one")
    text_width = int(_need(sd, "ln_final.weight", source, 1).shape[0])
    text_layers = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
    if not text_layers:  # else a file without its text blocks would build a 0-layer text tower
        _need(sd, "transformer.resblocks.0.attn.in_proj_weight", source, 2)
    if text_width % 64:
        raise OpenAIClipError(
            f"{source}: 'ln_final.weight' gives text width {text_width}, not a multiple of 64"
        )
    return OpenAIClipConfig(
        vision_layers=tuple(layers),  # type: ignore[arg-type]
        vision_width=width,
        embed_dim=int(_need(sd, "text_projection", source, 2).shape[1]),
        image_resolution=grid * 32,
        context_length=int(_need(sd, "positional_embedding", source, 2).shape[0]),
        vocab_size=int(_need(sd, "token_embedding.weight", source, 2).shape[0]),
        text_width=text_width,
        text_layers=text_layers,
    )


def build_openai_clip(
    sd: Mapping[str, Tensor],
    source: str = "the state dict",
    expected: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> OpenAIClip:
    """A frozen, eval-mode :class:`OpenAIClip` holding ``sd``; every key checked before any is copied.

    :param expected: a name from :data:`KNOWN_LAYOUTS`; the file must be that layout (e.g. ``RN50``)."""
    cfg = config_from_state_dict(sd, source)
    if expected is not None:
        if expected not in KNOWN_LAYOUTS:
            raise OpenAIClipError(
                f"unknown ResNet CLIP {expected!r}: choose one of {', '.join(KNOWN_LAYOUTS)}"
            )
        if cfg.name != expected:
            layers, width, embed, res, text_width = KNOWN_LAYOUTS[expected]
            raise OpenAIClipError(
                f"{source} is not {expected}: it has blocks {cfg.vision_layers}, width {cfg.vision_width} "
                f"(from 'visual.layer1.0.conv1.weight'), embed dim {cfg.embed_dim}, resolution "
                f"{cfg.image_resolution}, text width {cfg.text_width}, but {expected} has blocks {layers}, "
                f"width {width}, embed dim {embed}, resolution {res}, text width {text_width}"
                + (f" (the file is {cfg.name})" if cfg.name != "custom" else "")
            )
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in OpenAIClip(cfg).state_dict().items()}
    for key, shape in shapes.items():
        if key not in sd:
            raise OpenAIClipError(
                f"{source} lacks {key!r} (a {cfg.name} ResNet CLIP needs it): incomplete file"
            )
        if tuple(sd[key].shape) != shape:
            raise OpenAIClipError(
                f"{source}: {key!r} has shape {tuple(sd[key].shape)}, but the architecture read from the "
                f"file ({cfg.name}: blocks {cfg.vision_layers}, width {cfg.vision_width}) needs {shape}"
            )
    for key in sd:
        if key not in shapes and key not in _META_KEYS:
            raise OpenAIClipError(
                f"{source} holds the unknown key {key!r}: not an OpenAI ResNet CLIP state dict"
            )
    model = OpenAIClip(cfg)
    model.load_state_dict({k: sd[k] for k in shapes}, strict=True)
    return model.to(dtype).requires_grad_(False).eval()


def load_openai_clip(
    path: str | Path, expected: str | None = None, dtype: torch.dtype = torch.float32
) -> OpenAIClip:
    """Read ``path`` (:func:`read_state_dict`) and build the model from it (:func:`build_openai_clip`)."""
    return build_openai_clip(read_state_dict(path), str(path), expected=expected, dtype=dtype)
