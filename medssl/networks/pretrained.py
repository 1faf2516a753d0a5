"""Load pretrained ViT weights into a network's encoder strictly, and say exactly what was loaded.

The transfer is done the timm way: a filter function translates the foreign state dict to the target's encoder
names (strip ``module.``/``_orig_mod.`` and ``vit.`` prefixes, drop the ViTAutoEnc decoder and stale
cross-attention weights, resample position embeddings to the target token grid), then the encoder sub-state is
loaded with ``strict=True`` and every loaded tensor is compared with its source afterwards.

Accepted sources (a path, read with ``weights_only=True``, or an already-loaded dict):

* medssl checkpoints (``format: medssl-checkpoint/1``; weights under ``state_dict``, and the ``network`` config
  tells the source token grid);
* ``{"state_dict": ...}`` files and bare state dicts, with or without DDP ``module.`` prefixes;
* ViTAutoEnc / ViT state dicts (``patch_embedding.*``, ``blocks.N.*``, ``norm.*``) and UNETR state dicts
  (``vit.*``; the decoder is skipped);
* MONAI <= 1.3 checkpoints, which have no ``blocks.N.norm_cross_attn.*``: MONAI 1.6's ``TransformerBlock``
  registers that LayerNorm even when ``with_cross_attention=False`` and never uses it then, so exactly those
  tensors are "not required" when cross-attention is off in the target block. MONAI 1.4-1.5 checkpoints may carry
  ``blocks.N.cross_attn.*`` weights (the block was built unconditionally); with cross-attention off in the target
  they are skipped with that reason.

A patch-embedding type mismatch (``conv`` vs ``perceptron``) or a hidden-size mismatch always raises
:class:`~medssl.errors.CheckpointError`. Otherwise loading raises unless every encoder tensor of the target was
loaded (or resampled) and no source encoder tensor was left without a place (a deeper source); only
``allow_partial=True`` turns that into a report.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medssl.checkpoint import FORMAT, load_checkpoint
from medssl.errors import CheckpointError, ConfigError

__all__ = [
    "LoadReport",
    "load_pretrained_vit",
    "with_pretrained_vit",
    "load_into_bundle",
    "filter_vit_state_dict",
    "resample_pos_embed",
]

logger = logging.getLogger(__name__)

_WRAPPERS = ("module.", "_orig_mod.")  # DDP / DataParallel and torch.compile
_ENCODER_ROOTS = ("patch_embedding.", "blocks.", "norm.")
_POS_EMBED = "patch_embedding.position_embeddings"
_CONV_EMBED = "patch_embedding.patch_embeddings.weight"
_PERCEPTRON_EMBED = "patch_embedding.patch_embeddings.1.weight"
_AUTOENC_DECODER = re.compile(r"^conv3d_transpose(_1)?\.")
_CROSS_ATTN = re.compile(r"^blocks\.(\d+)\.cross_attn\.")
_CROSS_ATTN_NORM = re.compile(r"^blocks\.(\d+)\.norm_cross_attn\.(weight|bias)$")

REASON_DECODER = "ViTAutoEnc decoder: the reconstruction head is not part of the encoder"
REASON_CROSS_ATTN = "unused cross-attention: MONAI 1.4-1.5 built it unconditionally; it is off in the target"
REASON_NOT_ENCODER = "not a ViT encoder tensor"
REASON_SHAPE = "shape mismatch"
REASON_UNEXPECTED = "no such tensor in the target encoder"


@dataclass
class LoadReport:
    """What :func:`load_pretrained_vit` did.

    Attributes:
        loaded: target tensors (with ``prefix``) that received a source tensor, resampled ones included.
        resampled: ``(target name, source shape, target shape)`` of tensors interpolated to a new token grid.
        skipped: ``(source name, reason)`` of source tensors that were not loaded.
        missing: target encoder tensors that received nothing (only possible with ``allow_partial=True``).
        source: the file (or ``<dict>``) the weights came from.
        not_required: target tensors that exist but are unused (``norm_cross_attn`` with cross-attention off)
            and were absent from the source; they keep their initial values.
        unexpected: source encoder tensors with no counterpart in the target (e.g. a deeper source); also listed
            in ``skipped``.
        total: number of encoder tensors of the target.
        prefix: the target's encoder prefix.
    """

    loaded: list[str]
    resampled: list[tuple[str, tuple, tuple]]
    skipped: list[tuple[str, str]]
    missing: list[str]
    source: str
    not_required: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    total: int = 0
    prefix: str = "vit."

    @property
    def complete(self) -> bool:
        """Every encoder tensor of the target loaded (or not required) and no source encoder tensor left over."""
        return not self.missing and not self.unexpected

    def summary(self) -> str:
        """One line, e.g. ``loaded 161/161 encoder tensors (1 resampled) from x.pt; skipped 4 (...); 0 missing``."""
        reasons = Counter(reason.split(":")[0] for _, reason in self.skipped)
        skipped = ", ".join(f"{n} {r}" for r, n in reasons.items())
        text = (
            f"loaded {len(self.loaded)}/{self.total} encoder tensors ({len(self.resampled)} resampled) "
            f"from {self.source}; skipped {len(self.skipped)} source tensors" + (f" ({skipped})" if skipped else "")
        )
        if self.not_required:
            text += f"; {len(self.not_required)} not required (unused cross-attention norms kept at init)"
        if self.unexpected:
            text += f"; {len(self.unexpected)} source encoder tensors without a target"
        return text + f"; {len(self.missing)} missing"

    def format(self) -> str:
        """The full report: every tensor with what happened to it (``medssl inspect --into``)."""
        lines = [self.summary(), f"target encoder prefix: {self.prefix!r} ({self.total} tensors)"]
        lines.append(f"loaded ({len(self.loaded)}):")
        lines += [f"  {name}" for name in self.loaded]
        lines.append(f"resampled ({len(self.resampled)}):")
        lines += [f"  {name}: {tuple(a)} -> {tuple(b)}" for name, a, b in self.resampled]
        lines.append(f"not required ({len(self.not_required)}):")
        lines += [f"  {name}" for name in self.not_required]
        lines.append(f"missing ({len(self.missing)}):")
        lines += [f"  {name}" for name in self.missing]
        lines.append(f"skipped ({len(self.skipped)}):")
        lines += [f"  {name}: {reason}" for name, reason in self.skipped]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- reading


def _read_source(source: str | os.PathLike | Mapping[str, Any]) -> tuple[str, dict[str, torch.Tensor], dict | None]:
    """``(name for messages, state dict, network config or None)`` from any accepted source."""
    if isinstance(source, (str, os.PathLike)):
        name = str(source)
        obj = load_checkpoint(source, require_format=False)
    elif isinstance(source, Mapping):
        name, obj = "<dict>", source
    else:
        raise CheckpointError(None, f"pretrained source must be a path or a dict, got {type(source).__name__}")
    if not isinstance(obj, Mapping):
        raise CheckpointError(name, f"expected a checkpoint dict or a state dict, found {type(obj).__name__}")
    network = None
    fmt = obj.get("format")
    if isinstance(fmt, str) and fmt.startswith("medssl-checkpoint"):
        if fmt != FORMAT:
            raise CheckpointError(name, f"unsupported checkpoint format {fmt!r} (this medssl reads {FORMAT!r})")
        state, network = obj.get("state_dict"), obj.get("network")
    elif isinstance(obj.get("state_dict"), Mapping):
        state = obj["state_dict"]
    else:
        state = obj
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError(name, "no state dict found (empty or not a dict)")
    not_tensors = [k for k, v in state.items() if not torch.is_tensor(v)]
    if not_tensors:
        raise CheckpointError(
            name,
            "no state dict found: expected a medssl checkpoint, a {'state_dict': ...} dict or a dict of tensors; "
            f"non-tensor entries: {sorted(map(str, not_tensors))[:8]}",
        )
    return name, dict(state), dict(network) if isinstance(network, Mapping) else None


def _strip_wrappers(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for w in _WRAPPERS:
            if key.startswith(w):
                key, changed = key[len(w) :], True
    return key


# ------------------------------------------------------------------------------------------- token grids


def _grid_from_sizes(img_size: Any, patch_size: Any, dims: int) -> tuple[int, ...] | None:
    from monai.utils import ensure_tuple_rep

    try:
        img = ensure_tuple_rep(img_size, dims)
        patch = ensure_tuple_rep(patch_size, dims)
        return tuple(int(i) // int(p) for i, p in zip(img, patch))
    except (TypeError, ValueError):
        return None


def _root_grid(n_tokens: int, dims: int) -> tuple[int, ...] | None:
    side = round(n_tokens ** (1.0 / dims))
    for s in (side - 1, side, side + 1):
        if s > 0 and s**dims == n_tokens:
            return (s,) * dims
    return None


def _config_grid(network: dict | None, n_tokens: int, dims: int) -> tuple[int, ...] | None:
    """The source token grid stated by a medssl checkpoint's network config (``img_size / patch_size``)."""
    if network and "img_size" in network:
        dims = int(network.get("spatial_dims", dims))
        grid = _grid_from_sizes(network["img_size"], network.get("patch_size", 16), dims)
        if grid and math.prod(grid) == n_tokens:
            return grid
    return None


def _target_grid(model: nn.Module, encoder: nn.Module, n_tokens: int) -> tuple[int, ...] | None:
    for m in (model, encoder):
        grid = getattr(m, "feat_size", None)
        if grid is not None and math.prod(grid) == n_tokens:
            return tuple(int(g) for g in grid)
        if hasattr(m, "img_size") and hasattr(m, "patch_size"):
            img = tuple(m.img_size) if isinstance(m.img_size, Sequence) else (m.img_size,)
            grid = _grid_from_sizes(m.img_size, m.patch_size, len(img))
            if grid and math.prod(grid) == n_tokens:
                return grid
    return _root_grid(n_tokens, 3)


def resample_pos_embed(pos: torch.Tensor, src_grid: Sequence[int], dst_grid: Sequence[int]) -> torch.Tensor:
    """Interpolate learnable position embeddings between token grids (trilinear in 3D, bilinear in 2D).

    Args:
        pos: ``(1, prod(src_grid), C)``, tokens in row-major grid order (as MONAI's patch embedding flattens).
        src_grid: source token grid, e.g. ``(2, 2, 2)`` for a 32^3 ROI with 16^3 patches.
        dst_grid: target token grid.

    Returns:
        ``(1, prod(dst_grid), C)`` in ``pos.dtype``.
    """
    if pos.ndim != 3 or pos.shape[1] != math.prod(src_grid):
        raise ValueError(
            f"pos must be (1, {math.prod(src_grid)}, C) for grid {tuple(src_grid)}, got {tuple(pos.shape)}"
        )
    if len(src_grid) != len(dst_grid) or len(src_grid) not in (2, 3):
        raise ValueError(f"grids must both be 2D or 3D, got {tuple(src_grid)} and {tuple(dst_grid)}")
    channels = pos.shape[-1]
    x = pos.detach().float().reshape(1, *src_grid, channels).movedim(-1, 1)
    mode = "trilinear" if len(src_grid) == 3 else "bilinear"
    x = F.interpolate(x, size=tuple(int(g) for g in dst_grid), mode=mode, align_corners=False)
    return x.movedim(1, -1).reshape(1, math.prod(dst_grid), channels).to(pos.dtype)


# -------------------------------------------------------------------------------------------- filtering


def _cross_attention_on(encoder: nn.Module, block: str) -> bool | None:
    """Whether target block ``block`` uses cross-attention; ``None`` when the target has no such block."""
    try:
        return bool(getattr(encoder.get_submodule(f"blocks.{block}"), "with_cross_attention", False))
    except AttributeError:
        return None


def filter_vit_state_dict(
    state: Mapping[str, torch.Tensor],
    model: nn.Module,
    *,
    prefix: str = "vit.",
    source_name: str = "<dict>",
    source_network: dict | None = None,
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Translate a foreign state dict to the target encoder's names (the timm-style filter step).

    Returns:
        ``(encoder sub-state keyed relative to prefix, report)``; nothing is loaded yet and the report's
        ``missing`` / ``unexpected`` say whether a strict load is possible.

    Raises:
        CheckpointError: patch-embedding type or hidden-size mismatch, or a position-embedding grid that cannot
            be inferred.
    """
    encoder = _encoder_module(model, prefix)
    target = encoder.state_dict()
    report = LoadReport([], [], [], [], source_name, total=len(target), prefix=prefix)

    renamed: dict[str, tuple[str, torch.Tensor]] = {}  # relative name -> (original name, tensor)
    stripped = {orig: _strip_wrappers(orig) for orig in state}
    has_prefix = bool(prefix) and any(k.startswith(prefix) for k in stripped.values())
    for orig, key in stripped.items():
        if has_prefix:
            if not key.startswith(prefix):
                report.skipped.append((orig, f"outside the encoder: not under '{prefix}'"))
                continue
            key = key[len(prefix) :]
        if key in renamed:
            raise CheckpointError(source_name, f"tensors {renamed[key][0]!r} and {orig!r} both map to {key!r}")
        renamed[key] = (orig, state[orig])

    _check_structure(renamed, target, source_name)

    out: dict[str, torch.Tensor] = {}
    for key, (orig, tensor) in renamed.items():
        if key in target:
            want = target[key].shape
            if key == _POS_EMBED:
                grids = _pos_embed_grids(tensor, want, model, encoder, source_network, source_name, orig)
                if grids is not None:
                    out[key] = resample_pos_embed(tensor, *grids)
                    report.resampled.append((prefix + key, tuple(tensor.shape), tuple(want)))
                    continue
            if tensor.shape == want:
                out[key] = tensor
            else:
                report.skipped.append((orig, f"{REASON_SHAPE}: {tuple(tensor.shape)} vs target {tuple(want)}"))
        elif _AUTOENC_DECODER.match(key):
            report.skipped.append((orig, REASON_DECODER))
        elif (m := _CROSS_ATTN.match(key)) and _cross_attention_on(encoder, m.group(1)) is False:
            report.skipped.append((orig, REASON_CROSS_ATTN))
        elif key.startswith(_ENCODER_ROOTS):
            report.skipped.append((orig, REASON_UNEXPECTED))
            report.unexpected.append(orig)
        else:
            report.skipped.append((orig, REASON_NOT_ENCODER))

    for key in target:
        if key in out:
            report.loaded.append(prefix + key)
        elif (m := _CROSS_ATTN_NORM.match(key)) and _cross_attention_on(encoder, m.group(1)) is False:
            report.not_required.append(prefix + key)
        else:
            report.missing.append(prefix + key)
    return out, report


def _pos_embed_grids(
    tensor: torch.Tensor,
    want: torch.Size,
    model: nn.Module,
    encoder: nn.Module,
    network: dict | None,
    name: str,
    orig: str,
) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """``(source grid, target grid)`` when the position embeddings need resampling, else ``None``."""
    dst = _target_grid(model, encoder, int(want[1]))
    dims = len(dst) if dst else 3
    known = _config_grid(network, int(tensor.shape[1]), dims)
    if tensor.shape == want and (known is None or known == dst):
        return None  # same token count and no evidence of another grid layout: load as is
    if dst is None:
        raise CheckpointError(name, f"cannot infer the target token grid for {int(want[1])} tokens")
    src = known or _root_grid(int(tensor.shape[1]), dims)
    if src is None:
        raise CheckpointError(
            name,
            f"cannot infer the token grid of {int(tensor.shape[1])} position embeddings ({orig} "
            f"{tuple(tensor.shape)}); save the source as a medssl checkpoint with its network config",
        )
    return src, dst


def _check_structure(renamed: Mapping[str, tuple[str, torch.Tensor]], target: Mapping[str, torch.Tensor], name: str):
    """Mismatches no partial load can fix: patch-embedding type and hidden size."""
    kinds = {_CONV_EMBED: "conv", _PERCEPTRON_EMBED: "perceptron"}
    src = [k for k in kinds if k in renamed]
    dst = [k for k in kinds if k in target]
    if src and dst and src[0] != dst[0]:
        s, d = src[0], dst[0]
        raise CheckpointError(
            name,
            f"patch embedding mismatch: the checkpoint has a {kinds[s]} embedding ({renamed[s][0]} "
            f"{tuple(renamed[s][1].shape)}), the target a {kinds[d]} one ({d} {tuple(target[d].shape)}); "
            f"build the network with proj_type='{kinds[s]}'",
        )
    for key in ("norm.weight", _POS_EMBED):
        if key in renamed and key in target:
            hs, ht = renamed[key][1].shape[-1], target[key].shape[-1]
            if hs != ht:
                raise CheckpointError(
                    name,
                    f"hidden size mismatch: the checkpoint has hidden_size={hs} ({renamed[key][0]} "
                    f"{tuple(renamed[key][1].shape)}), the target {ht} ({key} {tuple(target[key].shape)})",
                )


def _encoder_module(model: nn.Module, prefix: str) -> nn.Module:
    if not prefix:
        return model
    if not prefix.endswith("."):
        raise ValueError(f"prefix must be empty or end with '.', got {prefix!r}")
    try:
        return model.get_submodule(prefix[:-1])
    except AttributeError:
        raise ConfigError(None, f"{type(model).__name__} has no ViT encoder at '{prefix[:-1]}'") from None


# -------------------------------------------------------------------------------------------- loading


def load_pretrained_vit(
    model: nn.Module,
    source: str | os.PathLike | Mapping[str, Any],
    *,
    allow_partial: bool = False,
    prefix: str = "vit.",
) -> LoadReport:
    """Load a pretrained ViT (ViTAutoEnc, ViT, UNETR or medssl checkpoint) into ``model``'s encoder, strictly.

    Args:
        model: the target, e.g. :class:`medssl.networks.unetr.UNETR` (encoder under ``vit.``).
        source: a checkpoint path (read with ``weights_only=True``) or an already-loaded dict.
        allow_partial: report missing / unexpected encoder tensors instead of raising.
        prefix: the target's encoder prefix (``""`` when ``model`` is the ViT itself).

    Returns:
        the :class:`LoadReport`; its :meth:`~LoadReport.summary` is logged at INFO.

    Raises:
        CheckpointError: unreadable source, structural mismatch, or (unless ``allow_partial``) an encoder tensor
            of the target without source or a source encoder tensor without target. The model is unchanged then.

    Example::

        net = UNETR(1, 14, img_size=96)
        report = load_pretrained_vit(net, "runs/ssl/model.pt")
        print(report.summary())
    """
    name, state, network = _read_source(source)
    new_state, report = filter_vit_state_dict(state, model, prefix=prefix, source_name=name, source_network=network)
    if not report.complete and not allow_partial:
        problems = []
        if report.missing:
            problems.append(
                f"{len(report.missing)} of {report.total} encoder tensors have no source: {_few(report.missing)}"
            )
        mismatched = [f"{k} ({r.split(': ', 1)[1]})" for k, r in report.skipped if r.startswith(REASON_SHAPE)]
        if mismatched:
            problems.append(f"shape mismatches: {_few(mismatched)}")
        if report.unexpected:
            problems.append(
                f"{len(report.unexpected)} source encoder tensors have no place in the target: {_few(report.unexpected)}"
            )
        raise CheckpointError(name, "; ".join(problems) + " (allow_partial=True loads the rest and reports)")

    encoder = _encoder_module(model, prefix)
    full = encoder.state_dict()
    full.update(new_state)
    result = encoder.load_state_dict(full, strict=True)
    if result.missing_keys or result.unexpected_keys:  # strict=True raises first; kept as a guard
        raise CheckpointError(name, f"strict load reported {result}")
    after = encoder.state_dict()
    differ = [k for k, v in new_state.items() if not torch.equal(after[k].detach().cpu(), v.to(after[k].dtype).cpu())]
    if differ:
        raise CheckpointError(name, f"after loading, encoder tensors differ from the source: {_few(differ)}")
    logger.log(logging.INFO if report.complete else logging.WARNING, report.summary())
    return report


def with_pretrained_vit(
    model: nn.Module,
    checkpoint: str | os.PathLike | Mapping[str, Any] | None,
    *,
    allow_partial: bool = False,
    prefix: str = "vit.",
) -> nn.Module:
    """``model`` with ``checkpoint``'s ViT loaded (:func:`load_pretrained_vit`); ``None`` / ``""``: from scratch.

    The bundle-facing form, as it returns the network::

        network: "$medssl.networks.pretrained.with_pretrained_vit(@network_def().to(@device_obj), @pretrained_ckpt)"
    """
    if checkpoint is None or (isinstance(checkpoint, str) and not checkpoint):
        logger.info("no pretrained checkpoint: %s starts from scratch", type(model).__name__)
        return model
    load_pretrained_vit(model, checkpoint, allow_partial=allow_partial, prefix=prefix)
    return model


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def _few(names: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(names[:n])
    return shown + (f", ... ({len(names) - n} more)" if len(names) > n else "")


def _find_vit_prefix(net: nn.Module) -> str | None:
    for module_name, module in net.named_modules():
        if isinstance(getattr(module, "blocks", None), nn.ModuleList) and hasattr(module, "patch_embedding"):
            return f"{module_name}." if module_name else ""
    return None


def load_into_bundle(
    checkpoint: str | os.PathLike | Mapping[str, Any],
    bundle_config: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    allow_partial: bool = False,
) -> LoadReport:
    """Build a bundle's ``network_def`` and load ``checkpoint``'s ViT into it (``medssl inspect CKPT --into``).

    Args:
        checkpoint: the pretrained source (see :func:`load_pretrained_vit`).
        bundle_config: a bundle YAML/JSON, or a list of them merged in order (e.g. with an overlay).
        allow_partial: as in :func:`load_pretrained_vit`.

    Raises:
        ConfigError: missing config file, no ``network_def``, a ``network_def`` that fails to build, or a
            network without a ViT encoder.
        CheckpointError: as in :func:`load_pretrained_vit`.
    """
    from monai.bundle import ConfigParser

    files = [bundle_config] if isinstance(bundle_config, (str, os.PathLike)) else list(bundle_config)
    for f in files:
        if not Path(f).is_file():
            raise ConfigError(f, "bundle config does not exist")
    where = str(files[-1])
    parser = ConfigParser()
    try:
        parser.read_config([str(f) for f in files])
    except Exception as e:  # YAML / JSON syntax: name the file, keep the parser's first line
        raise ConfigError(where, f"cannot parse bundle config ({_first_line(e)})") from e
    if parser.get("network_def") is None:
        raise ConfigError(where, "bundle config has no 'network_def'")
    try:
        net = parser.get_parsed_content("network_def", instantiate=True)
    except Exception as e:  # any failure of the user's config: report it against the config id
        raise ConfigError(f"{where}#network_def", f"cannot build the network ({_first_line(e)})") from e
    if not isinstance(net, nn.Module) and callable(net):  # a `_mode_: callable` network_def builds on call
        try:
            net = net()
        except Exception as e:  # as above: the user's config fails to build
            raise ConfigError(f"{where}#network_def", f"cannot build the network ({_first_line(e)})") from e
    if not isinstance(net, nn.Module):
        raise ConfigError(f"{where}#network_def", f"expected a network, got {type(net).__name__}")
    prefix = _find_vit_prefix(net)
    if prefix is None:
        raise ConfigError(f"{where}#network_def", f"{type(net).__name__} has no ViT encoder to load weights into")
    return load_pretrained_vit(net, checkpoint, allow_partial=allow_partial, prefix=prefix)
