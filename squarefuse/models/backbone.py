"""Per-frame image backbone: a timm ViT-family model run on every frame of a clip.

The backbone turns a normalised clip ``[B,T,C,H,W]`` into tokens ``[B,T,N,D]``, where ``N``
counts the prefix tokens (class token, registers, distillation token) followed by the patch
tokens, exactly as timm's ``forward_features`` returns them.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import timm
import torch
import torch.utils.checkpoint
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from squarefuse.models.hub_weights import check_weights_reachable

__all__ = ["VideoBackbone", "prefix_group_matcher"]

# timm reports keys that a pretrained file did not provide only through this logger.
_TIMM_BUILDER_LOGGER = "timm.models._builder"

# Submodules that timm applies only after ``forward_features`` (pooling and classifier). We never
# call them, so their parameters would be trainable yet never receive a gradient, which
# DistributedDataParallel rejects unless ``find_unused_parameters`` is on.
_POOLING_MODULES = ("fc_norm", "attn_pool", "head_drop", "head")


def prefix_group_matcher(
    matcher: dict[str, Any] | Callable[[str], Any], prefix: str
) -> dict[str, Any] | Callable[[str], Any]:
    """Rewrites a timm ``group_matcher`` so that it matches parameters of a wrapping module.

    timm matchers are regexes over the model's own parameter names (``blocks.3.attn...``); once the
    model is a submodule, its names gain a prefix (``model.blocks.3.attn...``). Names outside the
    prefix match nothing, which timm maps to the last (highest lr) group.

    Args:
        matcher: A timm matcher: a dict of group name -> regex or list of ``(regex, suffix)``, or a
            callable mapping a name to group ordinals.
        prefix: The submodule path followed by a dot, e.g. ``"model."``.

    Returns:
        A matcher of the same kind for the prefixed names.
    """
    if callable(matcher):

        def _match(name: str) -> Any:
            if not name.startswith(prefix):
                return (float("inf"),)
            return matcher(name[len(prefix) :])

        return _match

    escaped = prefix.replace(".", r"\.")

    def _wrap(pattern: str) -> str:
        # timm compiles with re.match (anchored at the start) and sometimes writes
        # `^a|b|c`; wrapping the whole alternation keeps every branch under the prefix.
        return rf"^{escaped}(?:{pattern.removeprefix('^')})"

    prefixed: dict[str, Any] = {}
    for group, spec in matcher.items():
        if spec is None:
            prefixed[group] = None
        elif isinstance(spec, str):
            prefixed[group] = _wrap(spec)
        else:
            prefixed[group] = [(_wrap(pattern), suffix) for pattern, suffix in spec]
    return prefixed


@contextlib.contextmanager
def _capture_missing_key_reports() -> Iterator[list[str]]:
    """Collects timm's "Missing keys" reports emitted while loading pretrained weights.

    timm loads non-strictly whenever the classifier is dropped (``num_classes=0``) and only logs
    the keys it could not fill at INFO level. A wrong weights file would then silently leave a
    randomly initialised backbone; capturing the report lets us reject it.
    """
    messages: list[str] = []

    class _Collector(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if message.startswith("Missing keys"):
                messages.append(message)

    logger = logging.getLogger(_TIMM_BUILDER_LOGGER)
    handler = _Collector(level=logging.INFO)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def _check_model_name(name: str) -> None:
    """Raises ValueError if ``name`` (``arch`` or ``arch.tag``) is not in timm's registry."""
    arch, _, tag = name.partition(".")
    if not timm.is_model(arch):
        raise ValueError(
            f"backbone.name={name!r}: unknown timm model; see timm.list_models('vit_*') for "
            f"the available architectures."
        )
    if tag and name not in timm.list_pretrained(name):
        raise ValueError(
            f"backbone.name={name!r}: timm has no pretrained tag {tag!r} for {arch!r}; see "
            f"timm.list_pretrained({arch + '.*'!r})."
        )


def _create_model(name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` that reports constructor argument mismatches as ValueError."""
    try:
        return timm.create_model(name, **kwargs)
    except TypeError as e:
        # Non-ViT models (ResNet, ConvNeXt, ...) reject img_size; misspelt model_kwargs land here too.
        raise ValueError(
            f"backbone.name={name!r} does not accept these arguments ({e}): it must be a "
            f"ViT-family timm model (vit_*, deit_*, eva*) and backbone.model_kwargs must be "
            f"arguments of its constructor."
        ) from e


class VideoBackbone(nn.Module):
    """A timm ViT-family image model applied to each frame of a clip.

    Supports timm models whose ``forward_features`` returns tokens ``[B,N,D]`` and that expose
    ``num_prefix_tokens`` (``vit_*``, ``deit_*``, ``eva*``, ViTs with registers, ...).

    Pretrained weights come from ``pretrained_path`` (a local ``.safetensors``/``.pth``/``.bin``
    state dict, or a big_vision ``.npz``) or, with no path, from the hub through timm. Local files
    go through timm's pretrained loader, so pos-embed is resampled when ``img_size`` differs from
    the file's and the classifier is dropped; the network is never used. Mean/std follow the
    pretrained config of ``name`` (``arch.tag``), so name the tag the weights were trained with.
    Layers timm applies after ``forward_features`` (``fc_norm``, ``attn_pool``, ``head``) are
    removed: the heads here pool the tokens themselves.

    Args:
        name: timm model name, ``arch`` or ``arch.tag`` (e.g. ``vit_base_patch16_224.augreg_in21k``).
        img_size: Input frame size (square).
        pretrained: Load pretrained weights (from ``pretrained_path`` if set, else the hub).
        pretrained_path: Local weights file; requires ``pretrained=True``.
        drop_path_rate: Stochastic depth rate.
        grad_checkpointing: Recompute block activations in backward to save memory.
        freeze: Freeze all backbone parameters; the backbone then runs without autograd and
            stays in eval mode (no drop path) even when the module is set to train.
        model_kwargs: Extra keyword arguments for ``timm.create_model`` (``depth``,
            ``patch_size``, ``class_token``, ``reg_tokens``, ...).
    """

    def __init__(
        self,
        name: str,
        img_size: int = 224,
        pretrained: bool = False,
        pretrained_path: str | None = None,
        drop_path_rate: float = 0.0,
        grad_checkpointing: bool = False,
        freeze: bool = False,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        _check_model_name(name)
        if pretrained_path is not None and not pretrained:
            raise ValueError(
                f"backbone.pretrained_path={pretrained_path!r} is set but backbone.pretrained is "
                f"false; set backbone.pretrained=true to load it."
            )
        create_kwargs: dict[str, Any] = dict(num_classes=0, img_size=img_size, drop_path_rate=drop_path_rate)
        create_kwargs.update(model_kwargs or {})

        if pretrained and pretrained_path is not None:
            self.model = self._create_from_file(name, os.fspath(pretrained_path), create_kwargs)
        elif pretrained:
            check_weights_reachable(name)
            try:
                self.model = _create_model(name, pretrained=True, **create_kwargs)
            except OSError as e:  # hub/URL download errors are OSError subclasses
                raise RuntimeError(
                    f"backbone.name={name!r}: could not fetch pretrained weights ({e}). Without "
                    f"network access, set backbone.pretrained_path to a local weights file, or train a "
                    f"small model from scratch with recipe=tiny_scratch."
                ) from e
        else:
            self.model = _create_model(name, pretrained=False, **create_kwargs)

        num_prefix_tokens = getattr(self.model, "num_prefix_tokens", None)
        if not isinstance(num_prefix_tokens, int) or not hasattr(self.model, "patch_embed"):
            raise ValueError(
                f"backbone.name={name!r}: not a ViT-family model (it has no patch tokens / "
                f"num_prefix_tokens); use a vit_*, deit_* or eva* model."
            )
        for attr in _POOLING_MODULES:
            module = getattr(self.model, attr, None)
            if isinstance(module, nn.Module) and any(True for _ in module.parameters()):
                setattr(self.model, attr, nn.Identity())

        self.name = name
        self.img_size = img_size
        self.embed_dim: int = int(self.model.embed_dim)
        self.num_prefix_tokens: int = num_prefix_tokens
        self.has_class_token: bool = getattr(self.model, "cls_token", None) is not None
        cfg = self.model.pretrained_cfg
        self.mean: tuple[float, float, float] = tuple(float(v) for v in cfg["mean"])
        self.std: tuple[float, float, float] = tuple(float(v) for v in cfg["std"])
        self.freeze = freeze

        if grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        if freeze:
            self.model.requires_grad_(False)
            self.model.eval()

    @staticmethod
    def _create_from_file(name: str, path: str, create_kwargs: dict[str, Any]) -> nn.Module:
        """Builds ``name`` and loads a local weights file through timm's pretrained loader."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"backbone.pretrained_path={path!r}: no such file.")
        is_npz = path.endswith(".npz")
        overlay = dict(
            file=path,
            # An empty source selects the local file ahead of any hub id in the default cfg.
            source="",
            # Some default cfgs (augreg) load via the model's big_vision .npz reader; a torch
            # state dict must take the generic path, which also resamples pos-embed.
            custom_load=is_npz,
        )
        with _capture_missing_key_reports() as missing:
            model = _create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **create_kwargs)
        if missing:
            raise ValueError(
                f"backbone.pretrained_path={path!r} does not fit {name!r} (model_kwargs included): {' '.join(missing)}"
            )
        return model

    def train(self, mode: bool = True) -> VideoBackbone:
        """Sets train mode; a frozen backbone stays in eval mode (deterministic features)."""
        super().train(mode)
        if self.freeze:
            self.model.eval()
        return self

    @property
    def num_tokens(self) -> int:
        """Tokens N per frame: the prefix tokens and the patch tokens at ``img_size``."""
        return self.num_prefix_tokens + int(self.model.patch_embed.num_patches)

    @property
    def num_blocks(self) -> int | None:
        """Number of transformer blocks a layer can be inserted after; None if not supported.

        Insertion runs timm's ``VisionTransformer.forward_features`` block by block, so it is
        offered for that class (``vit_*``, ``deit_*``) only.
        """
        return len(self.model.blocks) if isinstance(self.model, VisionTransformer) else None

    def forward(
        self, video_BTCHW: Tensor, after_block: Mapping[int, Callable[[Tensor], Tensor]] | None = None
    ) -> Tensor:
        """Runs the image model on every frame.

        Args:
            video_BTCHW: Normalised float clip ``[B,T,C,H,W]``.
            after_block: Optional ``{block index: fn}``: ``fn`` maps the tokens ``[B,T,N,D]``
                after that block to the tokens the next block gets (a temporal layer inside the
                backbone). Needs ``num_blocks`` to be set.

        Returns:
            Tokens ``[B,T,N,D]``, prefix tokens first.
        """
        if video_BTCHW.ndim != 5:
            raise ValueError(f"VideoBackbone expects a clip [B,T,C,H,W], got shape {tuple(video_BTCHW.shape)}")
        B, T, C, H, W = video_BTCHW.shape
        frames = video_BTCHW.reshape(B * T, C, H, W)
        grad_context = torch.no_grad() if self.freeze else contextlib.nullcontext()
        if after_block:
            tokens_FND = self._forward_with_insertions(frames, T, after_block)
        else:
            with grad_context:
                tokens_FND = self.model.forward_features(frames)
        if tokens_FND.ndim != 3:
            raise ValueError(
                f"backbone.name={self.name!r}: forward_features returned shape "
                f"{tuple(tokens_FND.shape)}, expected tokens [B*T,N,D]."
            )
        return tokens_FND.reshape(B, T, *tokens_FND.shape[1:])

    def _forward_with_insertions(
        self, frames: Tensor, T: int, after_block: Mapping[int, Callable[[Tensor], Tensor]]
    ) -> Tensor:
        """timm's ``VisionTransformer.forward_features``, block by block, with layers in between.

        A frozen backbone builds no graph up to the first inserted layer; after it, activations
        keep their graph (its parameters still get no gradient) so that the inserted layers,
        which do train, receive their gradients through the blocks that follow them.
        """
        if self.num_blocks is None:
            raise ValueError(
                f"backbone.name={self.name!r}: inserting layers after blocks needs a timm VisionTransformer, "
                f"got {type(self.model).__name__}"
            )
        model = self.model
        first = min(after_block)
        with torch.no_grad() if self.freeze else contextlib.nullcontext():
            x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(frames))))
            for block in model.blocks[: first + 1]:
                x = self._run_block(block, x)
        for index in range(first, len(model.blocks)):
            if index > first:
                x = self._run_block(model.blocks[index], x)
            if index in after_block:
                x_BTND = after_block[index](x.reshape(-1, T, *x.shape[1:]))
                x = x_BTND.reshape(x.shape)
        return model.norm(x)

    def _run_block(self, block: nn.Module, x: Tensor) -> Tensor:
        if self.model.grad_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        return block(x)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any] | Callable[[str], Any]:
        """timm layer grouping of the image model, for names under this module."""
        return prefix_group_matcher(self.model.group_matcher(coarse=coarse), "model.")

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameter names (under this module) that must not get weight decay."""
        names = self.model.no_weight_decay() if hasattr(self.model, "no_weight_decay") else set()
        return {f"model.{n}" for n in names}
