"""OpenAI CLIP ResNets (dbtr.models.openai_clip) and OpenAI's BPE tokenizer against OpenAI's own code.

The reference is ``clip/model.py`` / ``clip/simple_tokenizer.py`` of the ``openai-clip`` package on PyPI
(dbtr.testing.openai_reference fetches it once, hash-pinned); when it cannot be fetched these tests fail with
that message rather than skip."""

from __future__ import annotations

import copy
import gzip
import os
import pickle
import zipfile

import pytest
import torch
import torch.nn.functional as F

from dbtr.models.openai_clip import (
    KNOWN_LAYOUTS,
    OpenAIClip,
    OpenAIClipError,
    build_openai_clip,
    config_from_state_dict,
    load_openai_clip,
    read_state_dict,
)
from dbtr.testing import openai_reference
from dbtr.text.openai_bpe import OpenAIBPETokenizer, TokenizerFileError

# A small ResNet CLIP in OpenAI's layout: width 8 (attention pool 256 wide, 4 heads), 64 px, 2 text layers.
TINY = dict(
    embed_dim=32,
    image_resolution=64,
    vision_layers=(1, 2, 1, 1),
    vision_width=8,
    vision_patch_size=None,
    context_length=16,
    vocab_size=100,
    transformer_width=64,
    transformer_heads=1,
    transformer_layers=2,
)
# OpenAI's published configs (clip/model.py's CLIP arguments, as its build_model infers them).
PUBLISHED = {
    "RN50": dict(
        embed_dim=1024,
        image_resolution=224,
        vision_layers=(3, 4, 6, 3),
        vision_width=64,
        transformer_width=512,
        transformer_heads=8,
    ),
    "RN101": dict(
        embed_dim=512,
        image_resolution=224,
        vision_layers=(3, 4, 23, 3),
        vision_width=64,
        transformer_width=512,
        transformer_heads=8,
    ),
    "RN50x4": dict(
        embed_dim=640,
        image_resolution=288,
        vision_layers=(4, 6, 10, 6),
        vision_width=80,
        transformer_width=640,
        transformer_heads=10,
    ),
    "RN50x16": dict(
        embed_dim=768,
        image_resolution=384,
        vision_layers=(6, 8, 18, 8),
        vision_width=96,
        transformer_width=768,
        transformer_heads=12,
    ),
    "RN50x64": dict(
        embed_dim=1024,
        image_resolution=448,
        vision_layers=(3, 15, 36, 10),
        vision_width=128,
        transformer_width=1024,
        transformer_heads=16,
    ),
}


@pytest.fixture(scope="module")
def ref():
    return openai_reference.reference_model_module()


def _randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter and buffer random (OpenAI's init zeroes bn3 and keeps BN statistics at 0/1), at scales
    that keep activations O(1) through the random ResNet."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            n = torch.randn(t.shape, generator=g)
            if name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif ".bn" in name or "downsample.1" in name:
                t.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * n)
            elif t.ndim >= 2 and "embedding" not in name:
                fan_in = t[0].numel() if "text_projection" not in name else t.shape[0]
                t.copy_(n * fan_in**-0.5)
            else:
                t.copy_(0.1 * n)


@pytest.fixture(scope="module")
def tiny(ref):
    model = ref.CLIP(**TINY).eval()
    _randomise(model)
    return model


def _ours(reference) -> OpenAIClip:
    return build_openai_clip(copy.deepcopy(reference.state_dict()), "tiny")


class _Stop(Exception):
    pass


def _layer4(reference, pixels):
    """The reference trunk's output, captured at the input of its attention pool (which is then skipped)."""
    seen = {}

    def grab(module, args):
        seen["x"] = args[0]
        raise _Stop

    handle = reference.visual.attnpool.register_forward_pre_hook(grab)
    try:
        reference.encode_image(pixels)
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen["x"]


def _images(n=2, size=64, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _token_ids(n=3, length=16, vocab=100, seed=2):
    """Rows shaped like clip.tokenize's: SOT-ish ids, EOT = the largest id, zero padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(n, length, dtype=torch.long)
    for row, used in enumerate((5, 9, length)[:n]):
        ids[row, :used] = torch.randint(1, vocab - 1, (used,), generator=g)
        ids[row, used - 1] = vocab - 1
    return ids


# ------------------------------------------------------------------------------------ equal to OpenAI's code
@torch.no_grad()
def test_global_image_and_text_features_equal_openai(tiny):
    ours = _ours(tiny)
    pixels, ids = _images(), _token_ids()
    image, dense = ours.encode_image(pixels)
    torch.testing.assert_close(image, tiny.encode_image(pixels), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.encode_text(ids), tiny.encode_text(ids), atol=1e-5, rtol=1e-5)
    assert image.abs().mean() > 1e-2 and dense.shape == (2, 4, TINY["embed_dim"])  # not trivially zero


@torch.no_grad()
def test_dense_features_are_the_attention_pool_value_path(tiny):
    """OpenAI's own attention pool with each position attending only to itself and no positional embedding
    gives, per position, c_proj(v_proj(x)): our dense features must equal that."""
    ours = _ours(tiny)
    pixels = _images()
    _, dense = ours.encode_image(pixels)
    pool = tiny.visual.attnpool
    x = _layer4(tiny, pixels).flatten(2).permute(2, 0, 1)  # (HW, B, C) as OpenAI's pool arranges it
    only_self = torch.full((x.shape[0], x.shape[0]), float("-inf")).fill_diagonal_(0.0)
    out, _ = F.multi_head_attention_forward(
        query=x,
        key=x,
        value=x,
        embed_dim_to_check=x.shape[-1],
        num_heads=pool.num_heads,
        q_proj_weight=pool.q_proj.weight,
        k_proj_weight=pool.k_proj.weight,
        v_proj_weight=pool.v_proj.weight,
        in_proj_weight=None,
        in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
        bias_k=None,
        bias_v=None,
        add_zero_attn=False,
        dropout_p=0.0,
        out_proj_weight=pool.c_proj.weight,
        out_proj_bias=pool.c_proj.bias,
        use_separate_proj_weight=True,
        training=False,
        need_weights=False,
        attn_mask=only_self,
    )
    torch.testing.assert_close(dense, out.permute(1, 0, 2), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_global_without_positional_embedding_equals_openai_pool_with_zero_positions(tiny):
    ours = _ours(tiny)
    pixels = _images()
    without, _ = ours.encode_image(pixels, positional=False)
    reference = copy.deepcopy(tiny)
    reference.visual.attnpool.positional_embedding.zero_()
    torch.testing.assert_close(without, reference.encode_image(pixels), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(without, ours.encode_image(pixels)[0], atol=1e-3)  # the option does something


@torch.no_grad()
def test_eot_rules_agree_on_openai_tokenization_and_first_eos_handles_eot_padding(tiny):
    ours = _ours(tiny)
    ids = _token_ids()
    eot = TINY["vocab_size"] - 1
    padded_with_eot = torch.where(ids == 0, torch.full_like(ids, eot), ids)  # HF-style padding
    torch.testing.assert_close(
        ours.encode_text(padded_with_eot, eot="first_eos"), tiny.encode_text(ids), atol=1e-5, rtol=1e-5
    )


@torch.no_grad()
def test_other_input_sizes_resize_the_pool_positions_and_keep_the_value_path(tiny):
    """A 96 px input gives a 3x3 map: the 2x2 positional table is resized (bicubic), the dense features are
    still the value path of each position, and the global feature is a real pooled vector."""
    ours = _ours(tiny)
    pixels = _images(2, 96)
    image, dense = ours.encode_image(pixels)
    pool = tiny.visual.attnpool
    values = pool.c_proj(pool.v_proj(_layer4(tiny, _images(2, 96)).flatten(2).transpose(1, 2)))
    assert dense.shape == (2, 9, TINY["embed_dim"]) and image.shape == (2, TINY["embed_dim"])
    torch.testing.assert_close(dense, values, atol=1e-5, rtol=1e-5)
    table = ours.visual.attnpool._positions(3, 3)
    assert table.shape == (10, 256) and table[0].equal(ours.visual.attnpool.positional_embedding[0])


def test_published_layouts_are_inferred_from_openai_state_dicts(ref):
    """For each of the five published ResNets: OpenAI's module (on the meta device: shapes only) has exactly
    our keys and shapes, and the layout inferred from its state dict is the named one."""
    for name, arch in PUBLISHED.items():
        with torch.device("meta"):
            reference = ref.CLIP(
                **arch, vision_patch_size=None, context_length=77, vocab_size=49408, transformer_layers=12
            )
            sd = reference.state_dict()
            cfg = config_from_state_dict(sd, name)
            ours = OpenAIClip(cfg).state_dict()
        assert cfg.name == name
        assert cfg.vision_heads == arch["vision_width"] * 32 // 64
        assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in sd.items()}
        assert KNOWN_LAYOUTS[name][3] == cfg.image_resolution


# ---------------------------------------------------------------------------------------------- file formats
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")
def test_openai_torchscript_archive_is_read_without_running_it(tiny, tmp_path):
    """A traced OpenAI model saved as TorchScript (the format of OpenAI's RN50.pt): our reader's tensors equal
    torch.jit.load's (safe here: we wrote the file), and the model built from it equals the reference."""
    path = tmp_path / "RN-tiny.pt"
    torch.jit.trace(tiny, (_images(1), _token_ids(1)), check_trace=False).save(str(path))
    sd = read_state_dict(path)
    expected = torch.jit.load(str(path), map_location="cpu").state_dict()
    assert sd.keys() == expected.keys()
    for key in sd:
        torch.testing.assert_close(sd[key], expected[key], atol=0, rtol=0)
    model = load_openai_clip(path)
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode_image(_images())[0], tiny.encode_image(_images()), atol=1e-5, rtol=1e-5
        )


def _archive(path, payload: bytes) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", payload)
        zf.writestr("archive/constants.pkl", pickle.dumps(()))
        zf.writestr("archive/code/__torch__.py", "")


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['DBTR_TEST_MARKER']}",))


def test_torchscript_archive_needing_other_globals_is_refused_and_nothing_runs(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    monkeypatch.setenv("DBTR_TEST_MARKER", str(marker))
    path = tmp_path / "evil.pt"
    _archive(path, pickle.dumps(_Evil(), protocol=2))
    with pytest.raises(OpenAIClipError) as err:
        read_state_dict(path)
    assert str(path) in str(err.value) and "system" in str(err.value) and "torch.jit.load" in str(err.value)
    assert not marker.exists()


def test_open_clip_style_files_load(tiny, tmp_path):
    """.bin with a state_dict wrapper and module. prefixes; .safetensors: same model as the reference."""
    from safetensors.torch import save_file

    sd = tiny.state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, tmp_path / "m.bin")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "m.safetensors"))
    ids = _token_ids()
    for name in ("m.bin", "m.safetensors"):
        model = load_openai_clip(tmp_path / name)
        with torch.no_grad():
            torch.testing.assert_close(model.encode_text(ids), tiny.encode_text(ids), atol=1e-5, rtol=1e-5)
        assert not any(p.requires_grad for p in model.parameters()) and not model.training


# ---------------------------------------------------------------------------------------------- bad input
def _save(sd, tmp_path, name="bad.bin"):
    path = tmp_path / name
    torch.save(sd, path)
    return path


@pytest.mark.parametrize(
    ("edit", "key", "words"),
    [
        (lambda sd: sd.pop("visual.layer2.0.bn1.running_var"), "visual.layer2.0.bn1.running_var", "lacks"),
        (
            lambda sd: sd.update({"transformer.resblocks.1.mlp.c_fc.weight": torch.zeros(3, 64)}),
            "transformer.resblocks.1.mlp.c_fc.weight",
            "shape",
        ),
        (lambda sd: sd.update({"visual.extra.weight": torch.zeros(1)}), "visual.extra.weight", "unknown key"),
        (
            lambda sd: [sd.pop(k) for k in list(sd) if k.startswith("transformer.")],
            "transformer.resblocks.0.attn.in_proj_weight",
            "lacks",
        ),
        (
            lambda sd: sd.update({"visual.attnpool.positional_embedding": torch.zeros(7, 256)}),
            "visual.attnpool.positional_embedding",
            "square",
        ),
    ],
)
def test_bad_state_dicts_name_the_file_and_the_first_offending_key(tiny, tmp_path, edit, key, words):
    sd = copy.deepcopy(tiny.state_dict())
    edit(sd)
    path = _save(sd, tmp_path)
    with pytest.raises(OpenAIClipError) as err:
        load_openai_clip(path)
    assert str(path) in str(err.value) and repr(key) in str(err.value) and words in str(err.value)


def test_vit_state_dict_and_wrong_layout_are_refused(tiny, tmp_path):
    vit = {
        "visual.proj": torch.zeros(8, 4),
        "visual.class_embedding": torch.zeros(8),
        **{k: v for k, v in tiny.state_dict().items() if not k.startswith("visual.")},
    }
    with pytest.raises(OpenAIClipError, match="ViT"):
        load_openai_clip(_save(vit, tmp_path, "vit.bin"))
    with pytest.raises(OpenAIClipError) as err:
        load_openai_clip(_save(tiny.state_dict(), tmp_path, "tiny.bin"), expected="RN50")
    assert "is not RN50" in str(err.value) and "width 8" in str(err.value) and "tiny.bin" in str(err.value)
    with pytest.raises(OpenAIClipError, match="choose one of RN50, RN101"):
        load_openai_clip(tmp_path / "tiny.bin", expected="RN51")


def test_unreadable_files_are_user_errors(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    for name in ("junk.pt", "junk.safetensors", "absent.pt"):
        with pytest.raises(OpenAIClipError) as err:
            read_state_dict(tmp_path / name)
        assert name in str(err.value)


# ----------------------------------------------------------------------------------------------- tokenizer
@pytest.fixture(scope="module")
def bpe():
    return OpenAIBPETokenizer(openai_reference.bpe_vocab_path())


def test_tokenizer_reproduces_published_ids(bpe):
    out = bpe(["a photo of a cat"], padding="max_length", truncation=True, return_tensors="pt")
    assert out["input_ids"][0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert out["input_ids"].shape == (1, 77) and out["input_ids"][0, 7:].eq(0).all()
    assert out["attention_mask"][0].sum() == 7
    assert bpe("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]  # HF style
    assert bpe.tokenize(["a photo of a cat"]).equal(out["input_ids"])


def test_tokenizer_equals_openai_simple_tokenizer(bpe):
    reference = openai_reference.reference_tokenizer()
    texts = [
        "A PHOTO of a Dog,   sitting  on\ta sofa!!",
        "it's 3:45pm &amp; we'll see 2 cats' toys",
        "naïve café, Ünïcödé; 東京 and 🙂 emoji",
        "person, bicycle / motorbike -- tv-monitor (diningtable)",
    ]
    for text in texts:
        assert bpe.encode(text) == reference.encode(text), text
        assert bpe.decode(bpe.encode(text)) == reference.decode(reference.encode(text))


def test_tokenizer_truncates_with_eot_last(bpe):
    ids = bpe.tokenize(["cat " * 100], context_length=77)[0]
    assert ids[0] == 49406 and ids[-1] == 49407 and ids.argmax() == 76 and (ids[1:-1] == ids[1]).all()


def test_wrong_vocabulary_files_are_refused(tmp_path):
    short = tmp_path / "short.txt.gz"
    with gzip.open(short, "wt") as f:
        f.write("#version: 0.2\nt h\nth e</w>\n")
    plain = tmp_path / "plain.txt.gz"
    plain.write_text("not gzip")
    for path in (short, plain, tmp_path / "absent.txt.gz"):
        with pytest.raises(TokenizerFileError) as err:
            OpenAIBPETokenizer(path)
        assert str(path) in str(err.value)
    shuffled = tmp_path / "shuffled.txt.gz"  # right size, wrong ranks: the probe sentence catches it
    lines = gzip.open(openai_reference.bpe_vocab_path(), "rt", encoding="utf-8").read().split("\n")
    with gzip.open(shuffled, "wt", encoding="utf-8") as f:
        f.write("\n".join([lines[0], *reversed(lines[1:48895]), *lines[48895:]]))
    with pytest.raises(TokenizerFileError, match="is not OpenAI CLIP's BPE vocabulary"):
        OpenAIBPETokenizer(shuffled)


# ------------------------------------------------------------------------- behind ClipEncoder's interface
# The tiny ResNet with OpenAI's real vocabulary and context, so OpenAI's tokenizer drives it.
TINY_TEXT = {**TINY, "context_length": 77, "vocab_size": 49408}


@pytest.fixture(scope="module")
def rn_file(ref, tmp_path_factory):
    """A tiny ResNet CLIP saved as an open_clip-style .safetensors with the BPE vocabulary beside it."""
    import shutil

    from safetensors.torch import save_file

    reference = ref.CLIP(**TINY_TEXT).eval()
    _randomise(reference, seed=5)
    folder = tmp_path_factory.mktemp("rn")
    save_file(
        {k: v.contiguous() for k, v in reference.state_dict().items()}, str(folder / "RN-tiny.safetensors")
    )
    shutil.copy(openai_reference.bpe_vocab_path(), folder / "bpe_simple_vocab_16e6.txt.gz")
    return folder / "RN-tiny.safetensors", reference


@torch.no_grad()
def test_clip_encoder_loads_a_resnet_file_with_the_same_interface(rn_file):
    from dbtr.models.clip import ClipEncoder
    from dbtr.models.clip_resnet import ResNetClipEncoder

    path, reference = rn_file
    enc = ClipEncoder.from_pretrained(str(path), dense="maskclip")
    assert isinstance(enc, ResNetClipEncoder) and isinstance(enc, ClipEncoder)
    assert (enc.embed_dim, enc.image_size, enc.dense_stride, enc.text_width) == (32, 64, 32, 64)
    texts = ["a photo of a cat.", "a dog on a sofa next to a person"]
    tok = enc.tokenize(texts)
    assert tok["input_ids"].equal(enc.tokenizer.tokenize(texts))
    out = enc.encode_text(**tok)
    torch.testing.assert_close(
        out.text_embeds, F.normalize(reference.encode_text(tok["input_ids"]), dim=-1), atol=1e-5, rtol=1e-5
    )
    assert out.token_embeds.shape == (2, 77, 32) and out.attention_mask.sum(-1).tolist() == [8, 11]
    # prompt learning's path: from input embeddings, differentiable, equal to the global text feature
    embeds = enc.embed_tokens(tok["input_ids"]).requires_grad_(True)
    with torch.enable_grad():
        again = enc.encode_text_embeddings(embeds, enc.eot_index(tok["input_ids"]))
        again.sum().backward()
    torch.testing.assert_close(again, out.text_embeds, atol=1e-5, rtol=1e-5)
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0
    pixels = _images()
    img = enc.encode_image(pixels)
    torch.testing.assert_close(
        img.image_embeds, F.normalize(reference.encode_image(pixels), dim=-1), atol=1e-5, rtol=1e-5
    )
    assert img.patch_embeds.shape == (2, 4, 32)
    assert enc.fingerprint() == ClipEncoder.from_pretrained(str(path), dense="maskclip").fingerprint()
    with pytest.raises(ValueError, match="maskclip"):
        enc.encode_image(pixels, dense="clearclip")


def test_resnet_options_and_refusals(rn_file, tmp_path):
    from dbtr.models.clip import ClipEncoder
    from dbtr.utils.errors import ConfigError

    path, reference = rn_file
    no_pos = ClipEncoder.from_pretrained(str(path), dense="maskclip", resnet={"positional": False})
    with torch.no_grad():
        zeroed = copy.deepcopy(reference)
        zeroed.visual.attnpool.positional_embedding.zero_()
        torch.testing.assert_close(
            no_pos.encode_image(_images()).image_embeds,
            F.normalize(zeroed.encode_image(_images()), dim=-1),
            atol=1e-5,
            rtol=1e-5,
        )
    for vit_only in ("naive", "clearclip", "sclip", "naclip"):
        with pytest.raises(ConfigError, match=f"clip.dense={vit_only} is not available for a ResNet CLIP"):
            ClipEncoder.from_pretrained(str(path), dense=vit_only)
    for other in ("sclip", "naclip"):
        with pytest.raises(ValueError, match="maskclip"):
            no_pos.encode_image(_images(), dense=other)
    with pytest.raises(OpenAIClipError, match="is not RN50"):
        ClipEncoder.from_pretrained(str(path), dense="maskclip", resnet={"arch": "RN50"})
    alone = tmp_path / "alone.safetensors"
    alone.write_bytes(path.read_bytes())
    with pytest.raises(TokenizerFileError, match="bpe_simple_vocab_16e6.txt.gz next to it"):
        ClipEncoder.from_pretrained(str(alone), dense="maskclip")


@pytest.mark.slow
def test_train_and_eval_end_to_end_with_a_resnet_clip(rn_file, demo_dir, tmp_path):
    """``clip=rn50 clip.name_or_path=<file>`` through the console scripts: dbtr-train, then dbtr-eval of its
    checkpoint reproduces the test mAP on the same ResNet."""
    import json

    from cli_helpers import run_cli

    path, _ = rn_file
    clip = ["clip=rn50", f"clip.name_or_path={path}", "clip.resnet.arch=null"]
    run = tmp_path / "train"
    common = ["experiment=tiny_full", f"paths.tiny_dir={demo_dir}"]
    run_cli("dbtr-train", *common, *clip, f"hydra.run.dir={run}", "trainer.max_epochs=1", cwd=tmp_path)
    trained = json.loads((run / "metrics.json").read_text())
    assert trained["config"]["clip"]["resnet"]["positional"] is True
    ckpt = f"ckpt_path={trained['checkpoint']}"
    run_cli("dbtr-eval", *common, *clip, ckpt, f"hydra.run.dir={tmp_path / 'e'}", cwd=tmp_path)
    got = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert got["test"]["test/mAP"] == pytest.approx(trained["test"]["test/mAP"], abs=1e-9)


@pytest.mark.slow
@torch.no_grad()
def test_full_size_rn50_equals_openai(ref):
    """The published RN50 layout at full size (random weights): 32-head attention pool, 7x7 grid, 512-wide
    text tower; global, dense and text features equal OpenAI's."""
    reference = ref.CLIP(
        **PUBLISHED["RN50"],
        vision_patch_size=None,
        context_length=77,
        vocab_size=49408,
        transformer_layers=12,
    ).eval()
    _randomise(reference, seed=7)
    ours = build_openai_clip(reference.state_dict(), "RN50", expected="RN50")
    assert ours.visual.attnpool.num_heads == 32 and ours.config.name == "RN50"
    pixels, ids = _images(1, 224), _token_ids(2, 77, 49408)
    image, dense = ours.encode_image(pixels)
    torch.testing.assert_close(image, reference.encode_image(pixels), atol=1e-5, rtol=1e-5)
    pool = reference.visual.attnpool
    values = pool.c_proj(pool.v_proj(_layer4(reference, pixels).flatten(2).transpose(1, 2)))
    torch.testing.assert_close(dense, values, atol=1e-5, rtol=1e-5)
    assert dense.shape == (1, 49, 1024)
    torch.testing.assert_close(ours.encode_text(ids), reference.encode_text(ids), atol=1e-5, rtol=1e-5)


def test_taidpt_prompts_learn_on_a_resnet_clip(rn_file):
    """TaI-DPT's learned contexts through the ResNet's text tower: built with OpenAI's tokenizer, one row per
    class, and gradients reach the contexts."""
    from dbtr.models.clip import ClipEncoder
    from dbtr.models.prompts import PromptLearner

    path, _ = rn_file
    enc = ClipEncoder.from_pretrained(str(path), dense="maskclip")
    learner = PromptLearner(enc, ["cat", "dining table"], n_ctx=4, ctx_init="a photo of a")
    global_, local = learner(enc)
    assert global_.shape == local.shape == (2, enc.embed_dim)
    (global_.sum() + local.sum()).backward()
    grads = [p.grad for p in learner.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
