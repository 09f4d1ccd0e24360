"""TextEncoder: per-token open_clip embeddings, tokenizer, freezing, local checkpoints, tiny config registry."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer
from torch import nn

from occscene_pl.models import TextEncoder, register_tiny_config
from occscene_pl.models.text_encoder import CONFIG_DIR, TINY_CONFIG_NAME

PROMPTS = ["a street with parked cars at night", "an empty road in the rain"]
SOT, EOT = 49406, 49407  # open_clip's BPE start / end of text ids


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny ops on a shared 2-core machine: intra-op threads only add synchronisation stalls."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
