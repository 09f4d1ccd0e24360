"""TextEncoder: per-token open_clip embeddings, tokenizer, freezing, local checkpoints, tiny config registry."""

from __future__ import annotations

import json
import warnings
import zipfile
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer
from torch import nn

from occscene_pl.config_files import read_config
from occscene_pl.models import TextEncoder, register_tiny_config
from occscene_pl.models.text_encoder import CONFIG_DIR, TINY_CONFIG_NAME
from tests.conftest import REPO

PROMPTS = ["a street with parked cars at night", "an empty road in the rain"]
SOT, EOT = 49406, 49407  # open_clip's BPE start / end of text ids


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    torch.manual_seed(0)
    return TextEncoder(TINY_CONFIG_NAME)


@pytest.fixture(scope="module")
def custom_text_name(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny CustomTextCLIP config (text tower under ``model.text``), registered through open_clip's registry."""
    config = json.loads((CONFIG_DIR / f"{TINY_CONFIG_NAME}.json").read_text())
    config["custom_text"] = True
    path = tmp_path_factory.mktemp("clip") / "occscene-test-custom-text.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)
    return path.stem


def test_tiny_config_shipped_and_registered(encoder: TextEncoder) -> None:
    config = json.loads((CONFIG_DIR / f"{TINY_CONFIG_NAME}.json").read_text())
    assert config["embed_dim"] == 32
    assert config["text_cfg"] == dict(context_length=32, vocab_size=49408, width=32, heads=2, layers=2)
    assert open_clip.get_model_config(TINY_CONFIG_NAME) == config
    assert register_tiny_config() == TINY_CONFIG_NAME  # same settings again: a no-op
    assert encoder.width == 32 and encoder.context_length == 32
    assert isinstance(encoder.tokenizer, SimpleTokenizer) and encoder.tokenizer.context_length == 32


def test_shapes(encoder: TextEncoder) -> None:
    out = encoder(PROMPTS)
    assert out.shape == (2, 32, 32) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert encoder("one prompt").shape == (1, 32, 32)
    assert encoder(encoder.tokenize(PROMPTS)[:, :20]).shape == (2, 20, 32)
    with pytest.raises(ValueError, match=r"L <= 32"):
        encoder(torch.zeros(1, 33, dtype=torch.long))


def test_tokens_and_padding_after_eot(encoder: TextEncoder) -> None:
    tokens = encoder.tokenize(["a red car", ""])
    assert tokens.dtype == torch.long and tokens.shape == (2, 32)
    # "a", "red", "car" are single BPE words: SOT, 3 tokens, EOT, then zero padding.
    assert tokens[0, 0] == SOT and tokens[0, 4] == EOT and (tokens[0, 5:] == 0).all()
    assert tokens[1, :2].tolist() == [SOT, EOT] and (tokens[1, 2:] == 0).all()
    assert encoder.eot_token_id == EOT
    long_prompt = encoder.tokenize([" ".join(["car"] * 50)])
    assert long_prompt[0, -1] == EOT and (long_prompt[0] != 0).all()  # truncated, end token kept
    # Causal mask: what follows the end token cannot change the embeddings up to it.
    changed = tokens.clone()
    changed[:, 6:] = 320
    out, out_changed = encoder(tokens), encoder(changed)
    assert torch.equal(out[0, :6], out_changed[0, :6]) and not torch.allclose(out[0, 6:], out_changed[0, 6:])


def test_shorter_context_is_a_prefix() -> None:
    torch.manual_seed(0)
    full = TextEncoder(TINY_CONFIG_NAME)
    short = TextEncoder(TINY_CONFIG_NAME, context_length=12)
    short.load_state_dict(full.state_dict())
    assert short.tokenize(PROMPTS).shape == (2, 12)
    tokens = full.tokenize(["a red car"])
    assert torch.allclose(short(tokens[:, :12]), full(tokens)[:, :12], atol=1e-6)
    with pytest.raises(ValueError, match=r"context_length must be in \[1, 32\]"):
        TextEncoder(TINY_CONFIG_NAME, context_length=40)


def test_different_prompts_differ(encoder: TextEncoder) -> None:
    out = encoder([*PROMPTS, PROMPTS[0]])
    assert torch.equal(out[0], out[2])
    assert not torch.allclose(out[0, 1:], out[1, 1:], atol=1e-3)
    assert torch.equal(out[0, 0], out[1, 0])  # the start token sees only itself


def test_frozen(encoder: TextEncoder) -> None:
    parent = nn.ModuleDict({"text": encoder, "head": nn.Linear(2, 2)})
    parent.train()
    assert not encoder.training and all(not m.training for m in encoder.modules()) and parent["head"].training
    assert all(not p.requires_grad for p in encoder.parameters())
    assert not encoder(PROMPTS).requires_grad


def test_unfrozen_trains() -> None:
    enc = TextEncoder(TINY_CONFIG_NAME, freeze=False)
    enc.train()
    assert enc.training and all(p.requires_grad for p in enc.parameters())
    enc(PROMPTS).sum().backward()
    assert enc.model.token_embedding.weight.grad is not None


def test_visual_tower_dropped(encoder: TextEncoder) -> None:
    assert not hasattr(encoder.model, "visual")
    assert not any(name.startswith("model.visual") for name, _ in encoder.state_dict().items())


def _text_tower(model: nn.Module) -> nn.Module:
    return getattr(model, "text", model)


@pytest.mark.parametrize("kind", ["clip", "custom_text", "text_only"])
def test_loads_local_checkpoint(kind: str, custom_text_name: str, tmp_path: Path) -> None:
    name = custom_text_name if kind == "custom_text" else TINY_CONFIG_NAME
    torch.manual_seed(123)
    reference = open_clip.create_model(name).eval()
    assert isinstance(reference, open_clip.CustomTextCLIP if kind == "custom_text" else open_clip.CLIP)
    state = reference.state_dict()
    if kind == "text_only":
        state = {k: v for k, v in state.items() if not k.startswith("visual.")}
    path = tmp_path / "clip.pt"
    torch.save(state, path)

    torch.manual_seed(0)  # a different random init that the checkpoint must overwrite
    enc = TextEncoder(name, pretrained=str(path))
    random = TextEncoder(name)
    tokens = enc.tokenize(PROMPTS)
    out = enc(tokens)
    assert out.shape == (2, 32, 32) and not torch.allclose(out, random(tokens))
    # Pooling our per-token output at the end token and projecting reproduces open_clip's own encode_text.
    eot = tokens.argmax(dim=-1)
    projection = _text_tower(reference).text_projection
    pooled = out[torch.arange(2), eot]
    pooled = projection(pooled) if isinstance(projection, nn.Linear) else pooled @ projection
    with torch.no_grad():
        assert torch.allclose(pooled, reference.encode_text(tokens), atol=1e-5)
    if kind == "custom_text":
        tower = reference.text
        tower.output_tokens = True
        with torch.no_grad():
            assert torch.allclose(out, tower(tokens)[1], atol=1e-5)


def test_checkpoint_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match=rf"{missing}.*must be a local file"):
        TextEncoder(TINY_CONFIG_NAME, pretrained=str(missing))
    with pytest.raises(FileNotFoundError, match="laion2b_s32b_b82k.*local file"):
        TextEncoder(TINY_CONFIG_NAME, pretrained="laion2b_s32b_b82k")
    wrong = tmp_path / "wrong.pt"
    register_tiny_config("occscene-test-width16", width=16)
    torch.save(open_clip.create_model("occscene-test-width16").state_dict(), wrong)
    with pytest.raises(ValueError, match=rf"could not load open_clip checkpoint {wrong}"):
        TextEncoder(TINY_CONFIG_NAME, pretrained=str(wrong))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=str(garbage)):
        TextEncoder(TINY_CONFIG_NAME, pretrained=str(garbage))


@pytest.mark.parametrize("name", ["not-a-model", "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K"])
def test_unknown_model_name(name: str) -> None:
    with pytest.raises(ValueError, match="unknown open_clip model_name"):
        TextEncoder(name)


def test_register_tiny_config_variants() -> None:
    name = register_tiny_config("occscene-test-w24", width=24, layers=1, heads=3, context_length=16)
    assert open_clip.get_model_config(name)["text_cfg"] == dict(
        context_length=16, vocab_size=49408, width=24, heads=3, layers=1
    )
    enc = TextEncoder(name)
    assert enc.width == 24 and enc.context_length == 16 and len(enc.model.transformer.resblocks) == 1
    assert enc(["a car"]).shape == (1, 16, 24)
    with pytest.raises(ValueError, match="different settings"):
        register_tiny_config(name, width=48, heads=3)
    with pytest.raises(ValueError, match="heads dividing width"):
        register_tiny_config("occscene-test-bad", width=10, heads=3)
    with pytest.raises(ValueError, match="invalid config name"):
        register_tiny_config("hf-hub:x/y")


def test_packaged_demo_config() -> None:
    enc = TextEncoder("occscene-demo-clip")
    assert enc.width == 64 and len(enc.model.transformer.resblocks) == 2 and enc.context_length == 32


# --- Stable Diffusion v1.x conditioning, checked against an independent Hugging Face (transformers) encoding ---

SD_PROMPTS = ["a car parked on a street", ""]  # a prompt and guidance's empty prompt: 2 x 77 = 154 token embeddings
SD_LENGTH = 77  # SD v1's tokenizer model_max_length and CLIPTextModel's max_position_embeddings
SD_TINY_NAME = "occscene-test-sd-tiny-quickgelu"
GELU_TINY_NAME = "occscene-test-sd-tiny-gelu"
TOKEN_ATOL = 1e-5  # per-token max |difference| counted as equal (float32 round-off is ~1e-7 here)
# Stable Diffusion v1.5's text_encoder/config.json (openai/clip-vit-large-patch14's text model).
SD15_TEXT_CONFIG = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
)
PAPER_CONFIGS = ["kitti", "nyuv2", "nuscenes_occupancy"]


@pytest.fixture(scope="module")
def sd_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> object:
    """SD v1's tokenizer: Hugging Face ``CLIPTokenizer`` (pad token ``<|endoftext|>``) on CLIP's BPE files.

    ``vocab.json``/``merges.txt`` are written from the BPE data shipped with open_clip (OpenAI's
    ``bpe_simple_vocab_16e6``, the source of SD's tokenizer files), with the special tokens under HF's names.
    """
    transformers = pytest.importorskip("transformers", reason="the SD reference needs transformers (dev extra)")
    bpe = open_clip.get_tokenizer("ViT-L-14")  # built-in config: SimpleTokenizer, 77 tokens
    assert isinstance(bpe, SimpleTokenizer)
    names = {SOT: "<|startoftext|>", EOT: "<|endoftext|>"}
    vocab = {names.get(index, token): index for token, index in bpe.encoder.items()}
    merges = [" ".join(pair) for pair, _ in sorted(bpe.bpe_ranks.items(), key=lambda item: item[1])]
    directory = tmp_path_factory.mktemp("sd-tokenizer")
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = transformers.CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"))
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (SOT, EOT, EOT)
    return tokenizer


@pytest.fixture(scope="module")
def sd_text_model() -> nn.Module:
    """A tiny random ``CLIPTextModel`` with SD v1's text settings (QuickGELU, 77 positions), weights perturbed.

    Every parameter (LayerNorm weights and biases included) gets noise so that no part of the mapping to open_clip is
    checked only on its initial ones and zeros.
    """
    transformers = pytest.importorskip("transformers", reason="the SD reference needs transformers (dev extra)")
    config = transformers.CLIPTextConfig(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=SD_LENGTH,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=SOT,
        eos_token_id=EOT,
        pad_token_id=EOT,
    )
    torch.manual_seed(7)
    model = transformers.CLIPTextModel(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.2 * torch.randn_like(parameter))
    return model


def _sd_conditioning(tokenizer: object, model: nn.Module, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """SD v1.5 pipeline's prompt encoding: max-length padded, truncated tokens -> ``last_hidden_state``."""
    ids = tokenizer(prompts, padding="max_length", max_length=SD_LENGTH, truncation=True, return_tensors="pt")  # type: ignore[operator]
    with torch.no_grad():
        return ids.input_ids, model(ids.input_ids).last_hidden_state


def _open_clip_text_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Hugging Face ``CLIPTextModel`` weights under open_clip's CLIP text keys (q, k, v stacked into in_proj)."""
    hf = {key.removeprefix("text_model."): value for key, value in model.state_dict().items()}
    state = {
        "token_embedding.weight": hf["embeddings.token_embedding.weight"],
        "positional_embedding": hf["embeddings.position_embedding.weight"],
        "ln_final.weight": hf["final_layer_norm.weight"],
        "ln_final.bias": hf["final_layer_norm.bias"],
    }
    layers = {int(key.split(".")[2]) for key in hf if key.startswith("encoder.layers.")}
    for i in sorted(layers):
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            state[f"{dst}attn.in_proj_{kind}"] = torch.cat([hf[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv"])
            for ours, theirs in [
                ("attn.out_proj", "self_attn.out_proj"),
                ("ln_1", "layer_norm1"),
                ("ln_2", "layer_norm2"),
                ("mlp.c_fc", "mlp.fc1"),
                ("mlp.c_proj", "mlp.fc2"),
            ]:
                state[f"{dst}{ours}.{kind}"] = hf[f"{src}{theirs}.{kind}"]
    assert len(state) == 4 + 12 * len(layers)
    return state


def _encoder_with_sd_weights(sd_text_model: nn.Module, name: str, padding: str) -> TextEncoder:
    encoder = TextEncoder(name, padding=padding)  # type: ignore[arg-type]
    incompatible = encoder.model.load_state_dict(_open_clip_text_state(sd_text_model), strict=False)
    # Only the pooled-output projection and the contrastive temperature stay random: both unused per token.
    assert set(incompatible.missing_keys) == {"text_projection", "logit_scale"} and not incompatible.unexpected_keys
    return encoder


def _equal_tokens(ours: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-token equality ``(B, L)``: max absolute difference over the embedding at most ``TOKEN_ATOL``."""
    return (ours - reference).abs().amax(dim=-1) <= TOKEN_ATOL


@pytest.fixture(scope="module")
def sd_configs() -> tuple[str, str]:
    return (
        register_tiny_config(SD_TINY_NAME, context_length=SD_LENGTH, quick_gelu=True),
        register_tiny_config(GELU_TINY_NAME, context_length=SD_LENGTH),
    )


@pytest.mark.parametrize(
    "prompts",
    [
        SD_PROMPTS,
        ["A  Red\tCar, parked!! at 3.5 m/s", "night-time street ... with café signs"],
        [" ".join(["car"] * 100), "street " * 74 + "end"],  # truncated: 75 BPE tokens between start and end token
    ],
)
def test_eot_padding_tokens_equal_sd_tokenizer(prompts: list[str], sd_tokenizer: object, sd_configs: tuple) -> None:
    ids = sd_tokenizer(prompts, padding="max_length", max_length=SD_LENGTH, truncation=True, return_tensors="pt")  # type: ignore[operator]
    sd_ids = ids.input_ids
    eot = TextEncoder(sd_configs[0], padding="eot")
    zero = TextEncoder(sd_configs[0], padding="zero")
    assert eot.pad_token_id == EOT and zero.pad_token_id == 0 and "padding='eot'" in repr(eot)
    assert torch.equal(eot.tokenize(prompts), sd_ids)
    # open_clip's own padding differs from SD's exactly after the first end token, where it is 0.
    after_end = torch.arange(SD_LENGTH) > (sd_ids == EOT).int().argmax(dim=1, keepdim=True)
    zero_ids = zero.tokenize(prompts)
    assert torch.equal(zero_ids[~after_end], sd_ids[~after_end]) and (zero_ids[after_end] == 0).all()


def test_sd_v1_conditioning_exact(sd_tokenizer: object, sd_text_model: nn.Module, sd_configs: tuple) -> None:
    """Paper setting (QuickGELU tower, end-token padding): all 154 token embeddings equal SD v1.5's encoding.

    open_clip's zero padding matches only the 8 + 2 positions up to each end token (the causal mask hides what
    follows); the other 144 of 154 - all but two of guidance's empty prompt among them - are off SD's distribution.
    """
    sd_ids, reference = _sd_conditioning(sd_tokenizer, sd_text_model, SD_PROMPTS)
    assert sd_ids[0, :8].tolist() == [SOT, 320, 1615, 16487, 525, 320, 2012, EOT]  # CLIP's ids of the SD prompt
    assert reference.shape == (2, SD_LENGTH, 32)
    sd_like = _encoder_with_sd_weights(sd_text_model, sd_configs[0], "eot")
    out = sd_like(SD_PROMPTS)
    assert out.shape == reference.shape
    assert int(_equal_tokens(out, reference).sum()) == 154
    assert torch.allclose(out, reference, atol=TOKEN_ATOL, rtol=0)
    # The prompt path and a token path through tokenize() agree, and guidance's "" is SD's unconditional embedding.
    assert torch.equal(sd_like(sd_like.tokenize(SD_PROMPTS)), out)
    assert torch.allclose(sd_like([""])[0], reference[1], atol=TOKEN_ATOL, rtol=0)

    zero = _encoder_with_sd_weights(sd_text_model, sd_configs[0], "zero")
    equal = _equal_tokens(zero(SD_PROMPTS), reference)
    assert int(equal.sum()) == 10 and equal[0, :8].all() and equal[1, :2].all()


def test_quick_gelu_is_needed_for_sd(sd_tokenizer: object, sd_text_model: nn.Module, sd_configs: tuple) -> None:
    """HF's ``quick_gelu`` is open_clip's QuickGELU: the GELU tower with the same weights matches no token."""
    _, reference = _sd_conditioning(sd_tokenizer, sd_text_model, SD_PROMPTS)
    quick, gelu = (_encoder_with_sd_weights(sd_text_model, name, "eot") for name in sd_configs)
    assert type(quick.model.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    assert isinstance(gelu.model.transformer.resblocks[0].mlp.gelu, nn.GELU)
    assert int(_equal_tokens(quick(SD_PROMPTS), reference).sum()) == 154
    assert int(_equal_tokens(gelu(SD_PROMPTS), reference).sum()) == 0


@pytest.mark.parametrize("config", PAPER_CONFIGS)
def test_paper_configs_use_sd_v1_conditioning(config: str) -> None:
    section = read_config(REPO / "configs" / f"{config}.yaml")["model"]  # with base.yaml merged
    text = section["text_encoder"]
    assert text["model_name"] == "ViT-L-14-quickgelu" and text["padding"] == "eot"
    assert text["pretrained"] == "checkpoints/open_clip/ViT-L-14-openai.pt"
    # open_clip's ViT-L-14-quickgelu text tower has SD v1.5's text_encoder/config.json settings.
    model = open_clip.get_model_config(text["model_name"])
    text_cfg = model["text_cfg"]
    ours = dict(
        vocab_size=text_cfg["vocab_size"],
        hidden_size=text_cfg["width"],
        intermediate_size=int(text_cfg["width"] * text_cfg.get("mlp_ratio", 4.0)),
        num_hidden_layers=text_cfg["layers"],
        num_attention_heads=text_cfg["heads"],
        max_position_embeddings=text_cfg["context_length"],
        hidden_act="quick_gelu" if model.get("quick_gelu") else "gelu",
    )
    assert ours == SD15_TEXT_CONFIG


def test_padding_option_rejected() -> None:
    with pytest.raises(ValueError, match=r"padding must be 'eot' \(Stable Diffusion v1.x\) or 'zero'.*'sd1'"):
        TextEncoder(TINY_CONFIG_NAME, padding="sd1")  # type: ignore[arg-type]


# --- OpenAI's TorchScript checkpoint (open_clip's `openai` tag: ViT-L-14.pt) ---


def _openai_torchscript_archive(name: str, path: Path) -> dict[str, torch.Tensor]:
    """Write an OpenAI-style TorchScript CLIP archive of a random ``name`` model to ``path``.

    Like OpenAI's released files: a traced CLIP whose state dict has open_clip's CLIP keys, fp16 weights and the
    integer entries ``input_resolution``/``context_length``/``vocab_size``.

    Returns:
        The archive's weights rounded to fp16 and back, in open_clip's layout (what loading it must give).
    """
    torch.manual_seed(321)
    model = open_clip.create_model(name).eval()
    del model.context_length, model.vocab_size  # plain ints in open_clip; tensors in OpenAI's archives
    for key, value in [("input_resolution", 32), ("context_length", 32), ("vocab_size", 49408)]:
        model.register_buffer(key, torch.tensor(value))
    image, text = torch.randn(1, 3, 32, 32), torch.randint(0, 49408, (1, 32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit deprecation and tracer warnings
        traced = torch.jit.trace(model, (image, text), check_trace=False).half()
        torch.jit.save(traced, str(path))
    skip = {"input_resolution", "context_length", "vocab_size", "attn_mask"}
    return {key: value.half().float() for key, value in model.state_dict().items() if key not in skip}


@pytest.mark.parametrize("kind", ["clip", "custom_text"])
def test_loads_openai_torchscript_archive(kind: str, custom_text_name: str, tmp_path: Path) -> None:
    clip_name = register_tiny_config("occscene-test-quickgelu-32", quick_gelu=True)
    name = custom_text_name if kind == "custom_text" else clip_name
    path = tmp_path / "ViT-L-14.pt"
    weights = _openai_torchscript_archive(clip_name if kind == "clip" else TINY_CONFIG_NAME, path)
    # Why open_clip.load_checkpoint alone cannot read it: torch.load refuses TorchScript with weights_only=True.
    with pytest.raises(RuntimeError, match="weights_only"), pytest.warns(UserWarning, match="TorchScript archive"):
        torch.load(path, map_location="cpu", weights_only=True)

    torch.manual_seed(0)  # a different random init that the archive must overwrite
    enc = TextEncoder(name, pretrained=str(path))
    loaded = {k.removeprefix("model."): v for k, v in enc.state_dict().items()}
    if kind == "custom_text":
        weights = open_clip.model.convert_to_custom_text_state_dict(weights)
    text_weights = {k: v for k, v in weights.items() if not k.startswith("visual.")}
    assert set(loaded) == set(text_weights)
    assert all(loaded[k].dtype == torch.float32 and torch.equal(loaded[k], text_weights[k]) for k in text_weights)
    # Same per-token output as the same weights given as a plain state dict.
    plain = tmp_path / "clip.pt"
    torch.save(weights, plain)
    tokens = enc.tokenize(PROMPTS)
    assert torch.equal(enc(tokens), TextEncoder(name, pretrained=str(plain))(tokens))


def test_torchscript_archive_errors(tmp_path: Path) -> None:
    wrong = tmp_path / "wrong-width.pt"
    _openai_torchscript_archive(register_tiny_config("occscene-test-width16", width=16), wrong)
    with pytest.raises(ValueError, match=rf"could not load open_clip checkpoint {wrong}"):
        TextEncoder(TINY_CONFIG_NAME, pretrained=str(wrong))
    broken = tmp_path / "broken.pt"
    with zipfile.ZipFile(broken, "w") as archive:
        archive.writestr("broken/constants.pkl", b"not a pickle")
        archive.writestr("broken/code/__torch__/model.py", "")
    with pytest.raises(ValueError, match=rf"could not load open_clip checkpoint {broken}"):
        TextEncoder(TINY_CONFIG_NAME, pretrained=str(broken))
