"""Frozen open_clip text tower returning per-token embeddings (Stable Diffusion's text conditioning).

Stable Diffusion conditions its UNet's cross-attention on every token of the CLIP text transformer's last layer
after the final LayerNorm, not on the pooled sentence vector; :class:`TextEncoder` returns exactly those
``(B, L, D)`` states for any open_clip model whose text tower is open_clip's own transformer (``CLIP`` models and
``CustomTextCLIP`` models with a ``TextTransformer`` tower). Weights come from a local checkpoint file only; the
visual tower is dropped after loading. The BPE vocabulary of the tokenizer ships inside open_clip.

Stable Diffusion v1.x conditioning: SD v1.x was trained on OpenAI CLIP ViT-L/14 (QuickGELU activations) run on
Hugging Face ``CLIPTokenizer`` tokens padded to 77 with the end-of-text token (49407), with no padding mask; open_clip's
tokenizer pads with 0 (SD 2.x's convention). With a causal mask the embeddings up to the end token do not depend on
the padding, but every padded position does, including all but two positions of guidance's empty prompt. The
paper configs therefore use ``model_name: ViT-L-14-quickgelu`` and ``padding: eot``, which reproduce
``CLIPTextModel(...).last_hidden_state`` of SD v1.5's pipeline exactly (tested against ``transformers``).

Checkpoints: a state dict (``torch.save`` file read with ``weights_only=True``, or ``.safetensors``) in open_clip's
layout, or OpenAI's TorchScript archive (``ViT-L-14.pt``, open_clip's ``openai`` tag), whose weights are read through
``torch.jit.load`` (TorchScript's own deserializer; nothing is unpickled with ``weights_only=False``).

Tiny configs for tests and the CPU demo are JSON files in ``occscene_pl/models/configs/`` (``occscene-tiny-clip``:
width 32; ``occscene-demo-clip``: width 64). :class:`TextEncoder` registers a packaged config automatically when its
``model_name`` is one of them; :func:`register_tiny_config` registers variants through ``open_clip.add_model_config``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, get_args

import open_clip
import torch
from open_clip.model import convert_to_custom_text_state_dict
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import TextTransformer
from torch import Tensor, nn

__all__ = ["CONFIG_DIR", "TINY_CONFIG_NAME", "Padding", "TextEncoder", "register_tiny_config"]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
TINY_CONFIG_NAME = "occscene-tiny-clip"
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")

Padding = Literal["zero", "eot"]
"""Token after a prompt's end token: ``"eot"`` the end-of-text token 49407 (Stable Diffusion v1.x: Hugging Face
``CLIPTokenizer`` with ``pad_token="<|endoftext|>"``), ``"zero"`` token 0 (open_clip's tokenizer; SD 2.x)."""

# Entries of OpenAI's TorchScript state dict that are no weights (open_clip's build_model_from_openai_state_dict drops
# them too).
_OPENAI_NON_WEIGHTS = ("input_resolution", "context_length", "vocab_size")


def _packaged_config(name: str) -> Path | None:
    """The packaged open_clip config JSON called ``name``, if there is one."""
    path = CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    return path if all(key in config for key in ("embed_dim", "vision_cfg", "text_cfg")) else None


def _registered_config(name: str) -> dict[str, Any] | None:
    # Only plain registry names: a schema prefix (``hf-hub:``) would make open_clip fetch from the network.
    if not _NAME_PATTERN.fullmatch(name):
        return None
    return open_clip.get_model_config(name)


def register_tiny_config(
    name: str = TINY_CONFIG_NAME,
    width: int = 32,
    layers: int = 2,
    heads: int = 2,
    context_length: int = 32,
    vocab_size: int = 49408,
    quick_gelu: bool = False,
) -> str:
    """Register a tiny CLIP config (packaged ``occscene-tiny-clip.json`` with a changed text tower) in open_clip.

    Registration goes through ``open_clip.add_model_config`` with a JSON file: the packaged file itself for its
    default settings, otherwise a copy with the given text settings written to a temporary directory (removed
    right away; open_clip keeps the parsed config in its registry). Registering the same name with the same
    settings again is a no-op.

    Args:
        name: Registry name (letters, digits, ``_.-``).
        width: Text transformer width (the embedding size ``D`` of :class:`TextEncoder`).
        layers: Number of text transformer layers.
        heads: Number of attention heads (must divide ``width``).
        context_length: Token context length.
        vocab_size: Vocabulary size (49408 for open_clip's BPE tokenizer).
        quick_gelu: QuickGELU activations (``x * sigmoid(1.702 x)``) like OpenAI's CLIP and SD v1's text encoder
            (Hugging Face ``hidden_act="quick_gelu"``); False: exact GELU like the packaged config.

    Returns:
        ``name``, usable as ``TextEncoder(model_name=name)``.

    Raises:
        ValueError: Invalid name or settings, or ``name`` already registered with different settings.
    """
    if not _NAME_PATTERN.fullmatch(name):
        raise ValueError(f"register_tiny_config: invalid config name {name!r} (letters, digits, '_', '.', '-')")
    if min(width, layers, heads, context_length, vocab_size) < 1 or width % heads:
        raise ValueError(
            f"register_tiny_config: need positive settings with heads dividing width, got width={width}, "
            f"layers={layers}, heads={heads}, context_length={context_length}, vocab_size={vocab_size}"
        )
    template = CONFIG_DIR / f"{TINY_CONFIG_NAME}.json"
    config = json.loads(template.read_text())
    config["text_cfg"].update(
        width=width, layers=layers, heads=heads, context_length=context_length, vocab_size=vocab_size
    )
    if quick_gelu:
        config["quick_gelu"] = True
    existing = open_clip.get_model_config(name)
    if existing is not None:
        if existing == config:
            return name
        raise ValueError(
            f"register_tiny_config: open_clip already has a model config {name!r} with different settings "
            f"({existing['text_cfg']}); choose another name"
        )
    packaged = _packaged_config(name)
    if packaged is not None and json.loads(packaged.read_text()) == config:
        open_clip.add_model_config(packaged)
    else:
        with tempfile.TemporaryDirectory(prefix="occscene-open-clip-") as directory:
            path = Path(directory) / f"{name}.json"
            path.write_text(json.dumps(config, indent=4))
            open_clip.add_model_config(path)
    if open_clip.get_model_config(name) != config:
        raise RuntimeError(f"register_tiny_config: open_clip did not register the config {name!r}")
    return name


@contextlib.contextmanager
def _quiet_random_init_warning(active: bool) -> Iterator[None]:
    """Drop open_clip's "initialized randomly" warning while the weights are about to be loaded from a file."""

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")

    root = logging.getLogger()
    if active:
        root.addFilter(keep)
    try:
        yield
    finally:
        if active:
            root.removeFilter(keep)


def _is_torchscript_archive(path: Path) -> bool:
    """Whether ``path`` is a TorchScript zip (``torch.jit.save``: ``<archive>/constants.pkl`` and ``<archive>/code/``).

    ``torch.save`` zips hold ``data.pkl`` and ``data/`` only; torch itself tells the two apart by ``constants.pkl``.
    """
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        records = [name.split("/", 1)[-1] for name in archive.namelist()]
    return "constants.pkl" in records or any(record.startswith("code/") for record in records)


def _torchscript_state_dict(model: nn.Module, path: Path) -> dict[str, Tensor]:
    """Weights of a TorchScript CLIP archive (OpenAI's ``ViT-*.pt``) as a state dict for the open_clip ``model``.

    OpenAI's archive keys are open_clip's ``CLIP`` keys (open_clip builds its OpenAI models from them unchanged) plus
    three integer entries that are no weights; buffers that open_clip rebuilds itself (the non-persistent causal
    ``attn_mask``) are dropped as well. The fp16 tensors of OpenAI's archive are cast when loaded into the model.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.* is deprecated", category=Warning)
        archive = torch.jit.load(str(path), map_location="cpu")
    rebuilt = {name for name, _ in model.named_buffers()} - set(model.state_dict())
    state: dict[str, Tensor] = {
        key: value
        for key, value in archive.state_dict().items()
        if key not in _OPENAI_NON_WEIGHTS and key not in rebuilt and f"text.{key}" not in rebuilt
    }
    if isinstance(model, open_clip.CustomTextCLIP) and "positional_embedding" in state:
        state = convert_to_custom_text_state_dict(state)
    return state


def _model_config(model_name: str) -> dict[str, Any]:
    """The open_clip config of ``model_name``, registering a packaged config of that name when needed."""
    config = _registered_config(model_name)
    if config is None and _NAME_PATTERN.fullmatch(model_name):
        packaged = _packaged_config(model_name)
        if packaged is not None:
            open_clip.add_model_config(packaged)
            config = open_clip.get_model_config(model_name)
    if config is None:
        raise ValueError(
            f"TextEncoder: unknown open_clip model_name {model_name!r}; expected a registered open_clip config name "
            f"(e.g. ViT-L-14, ViT-B-32, {TINY_CONFIG_NAME}; hub names like 'hf-hub:...' are not supported)"
        )
    text_cfg = config.get("text_cfg", {})
    if "hf_model_name" in text_cfg or "hf_tokenizer_name" in text_cfg or "siglip" in model_name.lower():
        raise ValueError(
            f"TextEncoder: {model_name!r} uses a Hugging Face text model or tokenizer, which would be downloaded; "
            "only open_clip models with its own text transformer and BPE tokenizer are supported"
        )
    return config


class TextEncoder(nn.Module):
    """open_clip text transformer -> per-token embeddings ``(B, L, D)``.

    Stable Diffusion v1.5's conditioning is ``TextEncoder("ViT-L-14-quickgelu", pretrained=<OpenAI ViT-L-14>,
    padding="eot")`` (what the paper configs set): the same transformer (QuickGELU, 77 tokens), the same tokens
    (start token, BPE, end token, end tokens as padding) and the same output (last layer after the final LayerNorm,
    causal mask, no padding mask) as ``CLIPTextModel(tokenizer(prompts, padding="max_length"))[0]``.

    Args:
        model_name: open_clip config name (``ViT-L-14-quickgelu`` is Stable Diffusion v1's text encoder, OpenAI CLIP
            ViT-L/14; plain ``ViT-L-14`` uses exact GELU, the activation of LAION-trained open_clip weights; the
            packaged ``occscene-tiny-clip`` / ``occscene-demo-clip`` are registered on demand).
        pretrained: Local checkpoint file: an open_clip state dict (``.pt``/``.bin``/``.safetensors``, full CLIP
            model or its text part) or OpenAI's TorchScript archive (e.g. ``ViT-L-14.pt`` of open_clip's ``openai``
            tag); None = random init. Never a hub name or pretrained tag.
        freeze: Frozen: no gradients, always in eval mode (also after the parent's ``train()``), forward under
            ``torch.no_grad()``.
        context_length: Token length ``L`` (at most the model's; a shorter context uses the first positional
            embeddings, which is exact for the causal text transformer). Default: the model's.
        padding: Token filling the positions after a prompt's end token (:data:`Padding`): ``"eot"`` the end-of-text
            token like Stable Diffusion v1.x, ``"zero"`` (default, open_clip's own tokenizer) token 0 like SD 2.x.
            The default stays open_clip's so that models trained on open_clip tokens keep their inputs.

    Raises:
        FileNotFoundError: ``pretrained`` is not an existing file.
        ValueError: Unknown or unsupported ``model_name``, bad ``context_length`` or ``padding``, or a checkpoint that
            does not fit.
    """

    def __init__(
        self,
        model_name: str = "ViT-L-14",
        pretrained: str | None = None,
        freeze: bool = True,
        context_length: int | None = None,
        padding: Padding = "zero",
    ) -> None:
        super().__init__()
        _model_config(model_name)
        if padding not in get_args(Padding):
            raise ValueError(
                f"TextEncoder: padding must be 'eot' (Stable Diffusion v1.x) or 'zero' (open_clip, SD 2.x), "
                f"got {padding!r}"
            )
        self.padding: Padding = padding
        if pretrained is not None and not Path(pretrained).is_file():
            raise FileNotFoundError(
                f"TextEncoder: pretrained checkpoint {pretrained} does not exist; the open_clip weights must be a "
                "local file (hub names and pretrained tags are not downloaded)"
            )
        self.model_name = model_name
        self.freeze = freeze
        # No weights from anywhere at creation (pretrained_* False keeps timm/HF towers from downloading).
        with _quiet_random_init_warning(pretrained is not None):
            model = open_clip.create_model(model_name, pretrained=None, pretrained_image=False, pretrained_text=False)
        if pretrained is not None:
            self._load_checkpoint(model, Path(pretrained))
        if hasattr(model, "visual"):
            del model.visual
        self.model = model
        self._tower_name = self._find_tower(model)
        tower = self._tower

        max_length = int(tower.positional_embedding.shape[0])
        self.context_length = max_length if context_length is None else int(context_length)
        if not 1 <= self.context_length <= max_length:
            raise ValueError(
                f"TextEncoder: context_length must be in [1, {max_length}] for {model_name}, got {context_length}"
            )
        self.width = int(tower.token_embedding.embedding_dim)
        tokenizer = open_clip.get_tokenizer(model_name, context_length=self.context_length)
        if not isinstance(tokenizer, SimpleTokenizer):
            raise ValueError(
                f"TextEncoder: {model_name!r} uses {type(tokenizer).__name__}; only open_clip's SimpleTokenizer "
                "(BPE shipped in the package) is supported"
            )
        self.tokenizer = tokenizer

        if freeze:
            self.requires_grad_(False)
            self.eval()

    @staticmethod
    def _load_checkpoint(model: nn.Module, path: Path) -> None:
        try:
            if _is_torchscript_archive(path):
                incompatible = model.load_state_dict(_torchscript_state_dict(model, path), strict=False)
            else:
                incompatible = open_clip.load_checkpoint(model, str(path), strict=False)
        except Exception as error:  # torch.load / jit / safetensors / shape errors: one message naming the file
            raise ValueError(f"TextEncoder: could not load open_clip checkpoint {path}: {error}") from error
        missing = [key for key in incompatible.missing_keys if not key.startswith("visual.")]
        if missing or incompatible.unexpected_keys:
            raise ValueError(
                f"TextEncoder: checkpoint {path} does not match the text tower: missing {missing[:5]}"
                f"{'...' if len(missing) > 5 else ''}, unexpected {incompatible.unexpected_keys[:5]}"
            )

    @staticmethod
    def _find_tower(model: nn.Module) -> str:
        """Attribute name of the text tower inside ``model`` (``""``: the CLIP model itself)."""
        text = getattr(model, "text", None)
        if text is None and all(
            hasattr(model, key) for key in ("transformer", "token_embedding", "positional_embedding", "ln_final")
        ):
            return ""
        if isinstance(text, TextTransformer):
            if text.cls_emb is not None or text.use_pad_mask:
                raise ValueError(
                    "TextEncoder: text towers with a class token or padding mask (CoCa-style) are not supported"
                )
            return "text"
        raise ValueError(
            f"TextEncoder: unsupported open_clip text tower {type(text).__name__} in {type(model).__name__}; "
            "expected a CLIP model or a CustomTextCLIP with a TextTransformer"
        )

    @property
    def _tower(self) -> Any:  # open_clip's towers expose their parts as plain attributes
        return getattr(self.model, self._tower_name) if self._tower_name else self.model

    @property
    def eot_token_id(self) -> int:
        """Token id ending every prompt (49407); positions after it are padding (:attr:`pad_token_id`)."""
        return int(self.tokenizer.eot_token_id)

    @property
    def pad_token_id(self) -> int:
        """Token id after the end token: the end token itself for ``padding="eot"``, 0 for ``"zero"``."""
        return self.eot_token_id if self.padding == "eot" else 0

    def train(self, mode: bool = True) -> TextEncoder:
        """Set train mode; a frozen encoder stays in eval mode."""
        return super().train(mode and not self.freeze)

    def tokenize(self, prompts: list[str] | str) -> Tensor:
        """Tokenise with open_clip's BPE tokenizer (the vocabulary and merges of OpenAI's CLIP and SD's tokenizer).

        Args:
            prompts: ``B`` prompts (a single string is one prompt).

        Returns:
            ``(B, L)`` long tokens on the CPU: start token, BPE tokens, end token, then :attr:`pad_token_id` up to
            ``L`` (longer prompts are truncated to ``L`` with the end token kept last, like ``CLIPTokenizer``'s
            ``truncation=True``).
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        tokens = self.tokenizer(list(prompts), context_length=self.context_length)
        if self.padding == "eot":
            # Padding starts after the first end token (token 0 is also a real BPE token, "!", so match positions).
            end = (tokens == self.eot_token_id).int().argmax(dim=1, keepdim=True)
            tokens = tokens.masked_fill(torch.arange(tokens.shape[1]) > end, self.eot_token_id)
        return tokens

    def forward(self, prompts: list[str] | str | Tensor) -> Tensor:
        """Per-token embeddings of the last transformer layer after ``ln_final``.

        Args:
            prompts: ``B`` prompts, or ``(B, L)`` tokens from :meth:`tokenize` (``L`` up to the model's context).

        Returns:
            ``(B, L, D)`` float embeddings on the module's device.
        """
        tokens = prompts if isinstance(prompts, Tensor) else self.tokenize(prompts)
        tower = self._tower
        if tokens.ndim != 2 or tokens.shape[1] > tower.positional_embedding.shape[0]:
            raise ValueError(
                f"TextEncoder: tokens must be (B, L) with L <= {tower.positional_embedding.shape[0]}, got "
                f"{tuple(tokens.shape)}"
            )
        tokens = tokens.to(tower.token_embedding.weight.device)
        with torch.no_grad() if self.freeze else contextlib.nullcontext():
            return self._encode(tower, tokens)

    @staticmethod
    def _encode(tower: Any, tokens: Tensor) -> Tensor:
        # open_clip's encode_text without the pooling and projection.
        length = tokens.shape[1]
        cast_dtype = tower.transformer.get_cast_dtype()
        x = tower.token_embedding(tokens).to(cast_dtype)
        x = x + tower.positional_embedding[:length].to(cast_dtype)
        mask = tower.attn_mask
        if mask is not None:
            mask = mask[:length, :length]
        x = tower.transformer(x, attn_mask=mask)
        return tower.ln_final(x)

    def extra_repr(self) -> str:
        """Model name, width, context length and padding, for ``repr(module)``."""
        return (
            f"model_name={self.model_name!r}, width={self.width}, context_length={self.context_length}, "
            f"padding={self.padding!r}"
        )
