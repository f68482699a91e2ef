"""SigLIP behind ClipEncoder (dbtr/models/clip_siglip.py) on a tiny random SiglipModel with a real
sentencepiece SiglipTokenizer, saved and loaded by path: features against transformers' own SigLIP code, the
dense value path against the head run patch by patch, prompt learning, refusals, and every model config
through dbtr-train."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cli_helpers import run_cli
from dbtr.models.clip import ClipEncoder, ClipWeightsNotFound, InvalidClipFolder
from dbtr.utils.errors import ConfigError

CONF = Path(__file__).resolve().parents[1] / "conf"
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml") if p.stem != "from_checkpoint")
TEXTS = ["a photo of a red square and a blue ball.", "There is a Green box", "an image with a yellow block"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """The tiny fixture data with a random SigLIP in siglip/ (what ``clip=tiny_siglip`` loads)."""
    from dbtr.testing.fixtures import make_tiny_dataset

    return make_tiny_dataset(
        tmp_path_factory.mktemp("siglip_data"),
        num_captions=96,
        num_val=24,
        num_test=32,
        clip=False,
        siglip=True,
    )


@pytest.fixture(scope="module")
def enc(data_dir):
    return ClipEncoder.from_pretrained(str(data_dir / "siglip"), dense="maskclip")


def _pixels(n=2, size=32, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# -------------------------------------------------------------------------------------- features vs HF
def test_loads_as_siglip_with_its_sizes(enc):
    from dbtr.models.clip_siglip import SiglipClipEncoder

    assert isinstance(enc, SiglipClipEncoder) and type(enc.model).__name__ == "SiglipModel"
    assert (
        type(enc.tokenizer).__name__ == "SiglipTokenizer"
    )  # the sentencepiece tokenizer, as google/siglip-*
    # no projection: the joint space is the vision width (48); the text tower is 64 wide
    assert (enc.embed_dim, enc.text_width, enc.image_size, enc.dense_stride, enc.max_length) == (
        48,
        64,
        32,
        8,
        64,
    )
    assert enc.image_mean == enc.image_std == (0.5, 0.5, 0.5)


@pytest.mark.parametrize("size", [32, 48])
def test_global_image_feature_is_get_image_features(enc, size):
    px = _pixels(3, size)
    out = enc.encode_image(px, normalize=False)
    ref = enc.model.get_image_features(pixel_values=px, interpolate_pos_encoding=size != 32).pooler_output
    torch.testing.assert_close(out.image_embeds, ref, atol=1e-5, rtol=1e-5)
    assert out.patch_embeds.shape == (3, (size // 8) ** 2, 48)
    normed = enc.encode_image(px)
    torch.testing.assert_close(normed.image_embeds, F.normalize(ref, dim=-1), atol=1e-5, rtol=1e-5)


def test_text_feature_is_get_text_features_on_max_length_padding(enc):
    tok = enc.tokenize(TEXTS)
    ids = tok["input_ids"]
    # padded with </s> to exactly 64 on the right, as SigLIP was trained (padding="max_length")
    assert ids.shape == (3, 64) and bool((ids[:, -1] == enc.tokenizer.pad_token_id).all())
    plain = [enc.tokenizer(t)["input_ids"] for t in TEXTS]
    assert tok["attention_mask"].sum(-1).tolist() == [len(p) for p in plain]
    assert all(p[-1] == enc.eos_token_id for p in plain) and enc.tokenizer.bos_token_id is None
    out = enc.encode_text(**tok, normalize=False)
    ref = enc.model.get_text_features(input_ids=ids).pooler_output  # no mask: pads attended, as trained
    torch.testing.assert_close(out.text_embeds, ref, atol=1e-5, rtol=1e-5)
    assert enc.eot_index(ids).tolist() == [63, 63, 63]
    # local token features: the head on every position of the same pass; the mask keeps words + </s>
    hidden = enc.model.text_model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(out.token_embeds, enc.model.text_model.head(hidden), atol=1e-5, rtol=1e-5)
    assert out.attention_mask.tolist() == tok["attention_mask"].bool().tolist()
    with pytest.raises(ValueError, match="exactly 64 tokens"):
        enc.encode_text(ids[:, :32])


def _reference_dense(model, px):
    """The MAP head of transformers run on each patch token alone: one key, so the probe's attention weight
    is 1 (identity attention), then the head's own LN + MLP residual. Independent of dbtr's weight slicing."""
    cache = {}
    head = model.vision_model.head
    handle = head.register_forward_hook(lambda mod, args, out: cache.__setitem__("x", args[0]))
    model.vision_model(pixel_values=px, interpolate_pos_encoding=px.shape[-1] != 32)
    handle.remove()
    x = cache["x"]  # post_layernorm(last_hidden_state), what the head pools
    return torch.stack([head(x[:, i : i + 1]) for i in range(x.shape[1])], dim=1)


@pytest.mark.parametrize("size", [32, 48])
def test_dense_is_the_heads_value_path_per_patch(enc, size):
    px = _pixels(2, size, seed=1)
    got = enc.encode_image(px, normalize=False).patch_embeds
    torch.testing.assert_close(got, _reference_dense(enc.model, px), atol=1e-5, rtol=1e-5)
    # and written out by hand: v slice of in_proj, out_proj, then a + MLP(LN(a)) (per head, then merged)
    head = enc.model.vision_model.head
    cache = {}
    handle = head.register_forward_hook(lambda mod, args, out: cache.__setitem__("x", args[0]))
    enc.model.vision_model(pixel_values=px, interpolate_pos_encoding=size != 32)
    handle.remove()
    w, b, width = head.attention.in_proj_weight, head.attention.in_proj_bias, head.attention.embed_dim
    d = width // head.attention.num_heads
    per_head = [
        cache["x"] @ w[2 * width + h * d : 2 * width + (h + 1) * d].t()
        + b[2 * width + h * d : 2 * width + (h + 1) * d]
        for h in range(head.attention.num_heads)
    ]
    a = head.attention.out_proj(torch.cat(per_head, dim=-1))
    torch.testing.assert_close(got, a + head.mlp(head.layernorm(a)), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="maskclip"):
        enc.encode_image(px, dense="clearclip")


def test_dense_of_a_uniform_image_is_the_pooled_feature(enc):
    """When every patch token is the same vector the probe's attention is uniform over equal values: the
    pooled feature and each dense feature coincide (the dense path lives in the pooled feature's space)."""
    head = enc.model.vision_model.head
    x = torch.randn(1, 1, 48).expand(2, 16, 48)
    from dbtr.models.clip_siglip import head_value_path

    torch.testing.assert_close(
        head_value_path(head, x), head(x)[:, None].expand(2, 16, 48), atol=1e-5, rtol=1e-5
    )


def test_logit_scale_and_bias_are_siglips_and_leave_rankings_alone(enc):
    tok = enc.tokenize(TEXTS)
    px = _pixels(4)
    out = enc.model(input_ids=tok["input_ids"], pixel_values=px)
    assert enc.logit_scale == pytest.approx(10.0, rel=1e-5) and enc.logit_bias == pytest.approx(-10.0)
    cos = enc.encode_image(px).image_embeds @ enc.encode_text(**tok).text_embeds.t()
    torch.testing.assert_close(
        cos * enc.logit_scale + enc.logit_bias, out.logits_per_image, atol=1e-5, rtol=1e-5
    )
    probs = enc.probabilities(cos)
    torch.testing.assert_close(probs, torch.sigmoid(out.logits_per_image), atol=1e-6, rtol=1e-5)
    # one increasing map for every pair: the order of all scores (hence every AP) is the cosines' order
    assert torch.equal(probs.flatten().argsort(), cos.flatten().argsort())


# ------------------------------------------------------------------------------------------ prompt learning
def test_prompt_learning_path_equals_the_text_feature(enc):
    from dbtr.models.prompts import PromptLearner

    tok = enc.tokenize(TEXTS)
    embeds = enc.embed_tokens(tok["input_ids"]).requires_grad_(True)
    with torch.enable_grad():
        again = enc.encode_text_embeddings(embeds, enc.eot_index(tok["input_ids"]))
        again.sum().backward()
    torch.testing.assert_close(again, enc.encode_text(**tok).text_embeds, atol=1e-5, rtol=1e-5)
    assert embeds.grad is not None and embeds.grad[:, -1].abs().sum() > 0  # the pooled pad position is read
    ctx_ids = enc.tokenizer("a photo of a")["input_ids"][:-1]  # no BOS in SigLIP; drop </s>
    learner = PromptLearner(enc, ["red", "dining table"], n_ctx=len(ctx_ids), ctx_init="a photo of a")
    assert learner.lead == 0 and learner.token_ids.shape == (2, 64)  # context first, padded to 64 with </s>
    # with the context initialised to real token embeddings the prompt is the plain sentence
    plain = enc.tokenize(["a photo of a red.", "a photo of a dining table."])
    assert torch.equal(learner.token_ids[:, len(ctx_ids) :], plain["input_ids"][:, len(ctx_ids) :])
    global_, local = learner(enc)
    ref = enc.encode_text(**plain).text_embeds
    torch.testing.assert_close(global_, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(local, ref, atol=1e-5, rtol=1e-5)
    (global_.sum() + local.sum()).backward()
    assert learner.ctx_global.grad.abs().sum() > 0 and learner.ctx_local.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------- identity, refusals
def test_fingerprint_and_cache_identities(enc, data_dir, tmp_path):
    from dbtr.data.feature_cache import image_tower_identity, text_tower_identity
    from dbtr.models.tiny import save_random_siglip

    again = ClipEncoder.from_pretrained(str(data_dir / "siglip"))
    assert enc.fingerprint() == again.fingerprint() and len(enc.fingerprint()) == 16
    assert text_tower_identity(enc) == text_tower_identity(again)
    assert image_tower_identity(enc) == image_tower_identity(again)
    save_random_siglip(tmp_path / "other", TEXTS * 4, seed=1, vocab_size=64)
    other = ClipEncoder.from_pretrained(str(tmp_path / "other"))
    assert other.fingerprint() != enc.fingerprint()
    assert text_tower_identity(other) != text_tower_identity(enc)
    assert image_tower_identity(other) != image_tower_identity(enc)


def test_refusals_name_what_to_change(enc, data_dir, tmp_path):
    import shutil

    folder = str(data_dir / "siglip")
    with pytest.raises(
        ConfigError, match=r"clip.dense=clearclip is not available for a SigLIP model.*maskclip"
    ):
        ClipEncoder.from_pretrained(folder, dense="clearclip")
    with pytest.raises(ConfigError, match=r"clip.max_length=32 does not fit a SigLIP.*null or 64"):
        ClipEncoder.from_pretrained(folder, max_length=32)
    assert ClipEncoder.from_pretrained(folder, max_length=64).max_length == 64
    with pytest.raises(ClipWeightsNotFound, match=r"(?s)google/siglip-base-patch16-224.*SiglipModel"):
        ClipEncoder.from_pretrained("google/siglip-base-patch16-224", dense="maskclip")
    bare = tmp_path / "bare"
    shutil.copytree(folder, bare)
    (bare / "spiece.model").unlink()
    with pytest.raises(
        InvalidClipFolder, match="has no tokenizer files: it needs spiece.model or tokenizer.json"
    ):
        ClipEncoder.from_pretrained(str(bare), dense="maskclip")
    naflex = tmp_path / "naflex"
    naflex.mkdir()
    (naflex / "config.json").write_text(json.dumps({"model_type": "siglip2"}))
    with pytest.raises(InvalidClipFolder, match="SigLIP 2 NaFlex.*fixed-resolution"):
        ClipEncoder.from_pretrained(str(naflex))


def test_a_missing_sentencepiece_is_one_clear_error(data_dir, tmp_path):
    """Without sentencepiece (its import blocked in a fresh interpreter) the SigLIP tokenizer cannot load: one
    message naming the extra to install, no traceback wall."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['sentencepiece'] = None\n"
        "from dbtr.models.clip import ClipEncoder\n"
        "from dbtr.utils.errors import UserError\n"
        "try:\n"
        f"    ClipEncoder.from_pretrained({str(data_dir / 'siglip')!r})\n"
        "except UserError as err:\n"
        "    print('ERROR', err)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    line = [x for x in out.stdout.splitlines() if x.startswith("ERROR")]
    assert len(line) == 1, out.stdout + out.stderr[-2000:]
    assert "SentencePiece" in line[0] and "pip install 'dbtr[siglip]'" in line[0]


def test_datamodule_takes_siglips_normalisation_unless_given(enc, data_dir):
    from dbtr.data.datamodule import TextToImageDataModule
    from dbtr.data.images import CLIP_MEAN

    common = dict(classes=str(data_dir / "classes.txt"), train_captions=str(data_dir / "captions.jsonl"))
    dm = TextToImageDataModule(**common)
    assert dm.mean == CLIP_MEAN  # before an encoder is attached: CLIP's, as before
    dm.attach_encoder(enc)
    assert (dm.mean, dm.std, dm.image_size, dm.collate.max_length) == ((0.5,) * 3, (0.5,) * 3, 32, 64)
    own = TextToImageDataModule(**common, mean=(0.1, 0.2, 0.3), std=(1.0, 1.0, 1.0))
    own.attach_encoder(enc)
    assert own.mean == (0.1, 0.2, 0.3)


def test_siglip_b16_config_names_the_hub_model_and_fails_clearly_offline(data_dir, tmp_path):
    from test_bad_inputs import clean_failure

    proc = run_cli(
        "dbtr-train",
        "experiment=tiny_full",
        "clip=siglip_b16",
        f"paths.tiny_dir={data_dir}",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
        check=False,
    )
    clean_failure(proc, "Could not load CLIP weights from 'google/siglip-base-patch16-224'", "SiglipModel")


# ----------------------------------------------------------------------------- every model config, end to end
# TagCLIP needs a CLIP ViT's last block (its self-only attention): on SigLIP it is one clear refusal
VIT_CLIP_ONLY = ("tagclip",)


def test_every_model_config_is_covered():
    # a new model config must be run on SigLIP below or be named as ViT-CLIP-only
    assert set(MODELS) - set(VIT_CLIP_ONLY) == {
        "zsclip",
        "zsclip_centered",
        "zsclip_local",
        "calip",
        "taskres_global",
        "dual_noattn",
        "taidpt",
        "dbtr",
        "sparc",
    }


def _train(data_dir: Path, run: Path, model: str) -> dict:
    run_cli(
        "dbtr-train",
        "experiment=tiny_full",
        f"model={model}",
        "clip=tiny_siglip",
        f"paths.tiny_dir={data_dir}",
        f"hydra.run.dir={run}",
        "trainer.max_epochs=1",
        "quiet=true",
        cwd=run.parent,
    )
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["config"]["clip"]["name_or_path"] == str(data_dir / "siglip")
    assert metrics["config"]["clip"]["dense"] == "maskclip"
    assert 0.0 < metrics["test"]["test/mAP"] <= 100.0
    assert len(metrics["test"]["test/per_class_AP"]) == 6
    return metrics


def _check_checkpoint(metrics: dict, enc) -> None:
    """A trained run's checkpoint records this SigLIP's fingerprint and SigLIP's preprocessing."""
    meta = torch.load(metrics["checkpoint"], map_location="cpu", weights_only=True)["dbtr"]
    assert meta["clip_fingerprint"] == enc.fingerprint()
    assert meta["preprocessing"]["mean"] == meta["preprocessing"]["std"] == [0.5, 0.5, 0.5]


def test_full_method_trains_on_siglip_and_dbtr_eval_reproduces_it(data_dir, tmp_path, enc):
    """``model=dbtr clip=tiny_siglip`` through dbtr-train; dbtr-eval rebuilds the SigLIP from the checkpoint's
    clip settings (fingerprint and preprocessing checked) and its test mAP equals the training run's."""
    trained = _train(data_dir, tmp_path / "train", "dbtr")
    assert "test/mAP_local" in trained["test"]
    _check_checkpoint(trained, enc)
    run_cli(
        "dbtr-eval",
        f"ckpt_path={trained['checkpoint']}",
        "data=tiny",
        f"paths.tiny_dir={data_dir}",
        f"hydra.run.dir={tmp_path / 'eval'}",
        cwd=tmp_path,
    )
    got = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert got["test"]["test/mAP"] == pytest.approx(trained["test"]["test/mAP"], abs=1e-9)


def test_tagclip_on_siglip_is_one_clear_refusal(data_dir, tmp_path):
    from test_bad_inputs import clean_failure

    proc = run_cli(
        "dbtr-train",
        "experiment=tiny_full",
        "model=tagclip",
        "clip=tiny_siglip",
        f"paths.tiny_dir={data_dir}",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
        check=False,
    )
    clean_failure(proc, "clip.dense=tagclip is not available for a SigLIP model", "maskclip")


@pytest.mark.slow
@pytest.mark.parametrize("model", [m for m in MODELS if m != "dbtr" and m not in VIT_CLIP_ONLY])
def test_every_other_model_config_trains_and_tests_on_siglip(model, data_dir, tmp_path, enc):
    metrics = _train(data_dir, tmp_path / model, model)
    if metrics["checkpoint"] is not None:  # a trained head (training-free baselines skip fitting)
        _check_checkpoint(metrics, enc)
