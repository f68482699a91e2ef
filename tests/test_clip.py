"""ClipEncoder against independent computations on a small random CLIP loaded from disk."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dbtr.models.clip import ClipEncoder, ClipWeightsNotFound


def _reference_last_block_input(model, pixel_values):
    """Capture the last block's input with a forward pre-hook on the stock HF forward."""
    cache = {}
    last = model.vision_model.encoder.layers[-1]
    handle = last.register_forward_pre_hook(
        lambda mod, args, kwargs: cache.__setitem__("x", args[0] if args else kwargs["hidden_states"]),
        with_kwargs=True,
    )
    interpolate = tuple(pixel_values.shape[-2:]) != (model.config.vision_config.image_size,) * 2
    model.vision_model(pixel_values=pixel_values, interpolate_pos_encoding=interpolate)
    handle.remove()
    return cache["x"]


def _reference_prior(rows, cols, std):
    """NACLIP's neighbourhood prior token by token: CLS is token 0, patch t >= 1 sits at row (t-1)//cols,
    column (t-1)%cols; exp(-squared grid distance / (2 std^2)) between patches, 0 to and from CLS."""
    n = rows * cols + 1
    omega = torch.zeros(n, n)
    for i in range(1, n):
        for j in range(1, n):
            dr = (i - 1) // cols - (j - 1) // cols
            dc = (i - 1) % cols - (j - 1) % cols
            omega[i, j] = math.exp(-(dr * dr + dc * dc) / (2 * std * std))
    return omega


def _reference_dense(model, pixel_values, mode, naclip_std=5.0):
    """Per-head loops, written independently of dbtr's vectorised code (docs/method.md §2.2)."""
    x = _reference_last_block_input(model, pixel_values)
    layer = model.vision_model.encoder.layers[-1]
    attn = layer.self_attn
    y = layer.layer_norm1(x)
    q, k, v = attn.q_proj(y), attn.k_proj(y), attn.v_proj(y)
    heads, d = attn.num_heads, attn.head_dim
    patch = model.config.vision_config.patch_size
    rows, cols = pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch
    outs = []
    for h in range(heads):
        qh, kh, vh = (t[..., h * d : (h + 1) * d] for t in (q, k, v))
        if mode == "maskclip":
            outs.append(vh)
        elif mode == "clearclip":
            weights = torch.softmax(qh @ qh.transpose(1, 2) / math.sqrt(d), dim=-1)
            outs.append(weights @ vh)
        elif mode == "sclip":
            weights = torch.softmax(qh @ qh.transpose(1, 2) / math.sqrt(d), dim=-1)
            weights = weights + torch.softmax(kh @ kh.transpose(1, 2) / math.sqrt(d), dim=-1)
            outs.append(weights @ vh)
        else:  # naclip
            logits = kh @ kh.transpose(1, 2) / math.sqrt(d)
            if naclip_std is not None:
                logits = logits + _reference_prior(rows, cols, naclip_std)
            outs.append(torch.softmax(logits, dim=-1) @ vh)
    o = attn.out_proj(torch.cat(outs, dim=-1))
    if mode == "sclip":  # SCLIP keeps the block's residual and MLP
        o = x + o
        o = o + layer.mlp(layer.layer_norm2(o))
    return model.visual_projection(model.vision_model.post_layernorm(o[:, 1:]))


def test_loads_by_path_and_global_matches_hf(encoder):
    px = torch.randn(3, 3, 32, 32)
    out = encoder.encode_image(px, normalize=False)
    ref = encoder.model.get_image_features(pixel_values=px).pooler_output
    torch.testing.assert_close(out.image_embeds, ref, atol=1e-5, rtol=1e-5)
    assert out.patch_embeds.shape == (3, 16, encoder.embed_dim)


def test_dense_naive_equals_last_hidden_state(encoder):
    px = torch.randn(2, 3, 32, 32)
    hs = encoder.model.vision_model(pixel_values=px).last_hidden_state[:, 1:]
    ref = encoder.model.visual_projection(encoder.model.vision_model.post_layernorm(hs))
    torch.testing.assert_close(
        encoder.encode_image(px, normalize=False, dense="naive").patch_embeds, ref, atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("mode", ["maskclip", "clearclip", "sclip", "naclip"])
@pytest.mark.parametrize("size", [(32, 32), (48, 48), (32, 48)])
def test_dense_modes_match_reference(encoder, mode, size):
    px = torch.randn(2, 3, *size)
    got = encoder.encode_image(px, normalize=False, dense=mode)
    torch.testing.assert_close(
        got.patch_embeds, _reference_dense(encoder.model, px, mode), atol=1e-5, rtol=1e-5
    )
    assert got.patch_embeds.shape[1] == (size[0] // 8) * (size[1] // 8)
    # the global embedding is the untouched CLS path whatever the dense mode
    ref = encoder.model.get_image_features(pixel_values=px, interpolate_pos_encoding=size != (32, 32))
    torch.testing.assert_close(got.image_embeds, ref.pooler_output, atol=1e-5, rtol=1e-5)
    # normalised output is the normalised raw output
    norm = encoder.encode_image(px, dense=mode)
    torch.testing.assert_close(norm.patch_embeds, F.normalize(got.patch_embeds, dim=-1))


def test_naclip_prior_is_the_reference_gaussian():
    from dbtr.models.clip import neighbourhood_prior

    for rows, cols, std in ((4, 6, 5.0), (3, 5, 1.0), (2, 2, 0.5)):
        got = neighbourhood_prior((rows, cols), std).float()
        torch.testing.assert_close(got, _reference_prior(rows, cols, std), atol=1e-7, rtol=0)


def test_naclip_prior_shapes_the_attention(encoder):
    """Without the prior the output is measurably different: the reference test checks the prior."""
    px = torch.randn(1, 3, 32, 48)
    got = encoder.encode_image(px, normalize=False, dense="naclip").patch_embeds
    no_prior = _reference_dense(encoder.model, px, "naclip", naclip_std=None)
    assert (got - no_prior).abs().max() > 1e-3


def test_dense_modes_differ(encoder):
    from dbtr.models.clip import DENSE_MODES

    px = torch.randn(1, 3, 32, 32)
    outs = {m: encoder.encode_image(px, dense=m).patch_embeds for m in DENSE_MODES}
    for i, a in enumerate(DENSE_MODES):
        for b in DENSE_MODES[i + 1 :]:
            assert not torch.allclose(outs[a], outs[b]), (a, b)


def test_unknown_dense_mode_lists_the_modes(clip_dir, encoder):
    from dbtr.models.clip import DENSE_MODES
    from dbtr.utils.errors import ConfigError

    with pytest.raises(ConfigError, match="clip.dense=segclip is not a dense mode") as info:
        ClipEncoder.from_pretrained(str(clip_dir), dense="segclip")
    assert all(m in str(info.value) for m in DENSE_MODES)
    with pytest.raises(ConfigError, match="naclip"):
        encoder.encode_image(torch.randn(1, 3, 32, 32), dense="segclip")


def test_text_eot_is_first_eos_with_pad_equal_eos(encoder):
    tok = encoder.tokenize(["a red square", "a photo of a blue ball and a green box"])
    assert encoder.tokenizer.pad_token_id == encoder.eos_token_id  # the OpenAI convention we must handle
    ids = tok["input_ids"]
    eot = encoder.eot_index(ids)
    for row, pos in zip(ids.tolist(), eot.tolist()):
        assert row[pos] == encoder.eos_token_id and encoder.eos_token_id not in row[:pos]
    out = encoder.encode_text(**tok, normalize=False)
    ref = encoder.model.get_text_features(**tok).pooler_output
    torch.testing.assert_close(out.text_embeds, ref, atol=1e-5, rtol=1e-5)
    hidden = encoder.model.text_model(**tok).last_hidden_state
    torch.testing.assert_close(out.token_embeds, encoder.model.text_projection(hidden), atol=1e-5, rtol=1e-5)
    # the local mask covers SOT .. EOT inclusive, nothing after
    assert out.attention_mask.sum(1).tolist() == (eot + 1).tolist()


def test_text_without_eos_is_rejected(encoder):
    with pytest.raises(ValueError, match="EOS"):
        encoder.eot_index(torch.zeros(1, 5, dtype=torch.long))


def test_missing_local_folder_gives_one_clear_error(tmp_path):
    with pytest.raises(ClipWeightsNotFound) as info:
        ClipEncoder.from_pretrained(str(tmp_path / "no-such-clip"))
    msg = str(info.value)
    assert "no-such-clip" in msg and "clip.name_or_path" in msg and "save_pretrained" in msg


def test_folder_without_weights_gives_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ClipWeightsNotFound, match="Could not load CLIP weights"):
        ClipEncoder.from_pretrained(str(tmp_path / "empty"))


def test_offline_hub_id_gives_clear_error(monkeypatch):
    import transformers

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(transformers.CLIPModel, "from_pretrained", offline)
    with pytest.raises(ClipWeightsNotFound, match="openai/clip-vit-base-patch16"):
        ClipEncoder.from_pretrained("openai/clip-vit-base-patch16")


def test_encoder_is_frozen_and_stays_in_eval(encoder):
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.model.training


def test_legacy_eos_id_in_config_uses_the_tokenizer_eos(clip_dir):
    """OpenAI hub configs say eos_token_id=2 (a legacy value); the EOT position must come from the
    tokenizer."""
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(str(clip_dir))
    model.config.text_config.eos_token_id = 2
    tokenizer = CLIPTokenizer.from_pretrained(str(clip_dir))
    enc = ClipEncoder(model, tokenizer)
    tok = enc.tokenize(["a red square"])
    assert enc.eos_token_id == tokenizer.eos_token_id != 2
    assert int(enc.eot_index(tok["input_ids"])[0]) == int(tok["attention_mask"].sum()) - 1


def test_fingerprint_identifies_the_projection_weights(encoder, clip_dir):
    same = ClipEncoder.from_pretrained(str(clip_dir))
    assert same.fingerprint() == encoder.fingerprint()
    with torch.no_grad():
        same.model.visual_projection.weight[0, 0] += 1e-3
    assert same.fingerprint() != encoder.fingerprint()
