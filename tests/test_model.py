"""The unified model on the tiny profile: shapes, gradient routing, CFG, reference path, save/load, sampling."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from unirl.models import Conditioning, UnifiedModel, load_model_config
from unirl.models.io import CheckpointError
from unirl.models.sampling import next_token
from unirl.models.tiny import tiny_tokenizer
from unirl.train.losses import flow_matching_loss, lm_loss

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer")


@pytest.fixture
def model(tok):
    torch.manual_seed(0)
    return UnifiedModel.build(load_model_config("tiny"), tok)


def red_square() -> Image.Image:
    im = Image.new("RGB", (32, 32), (255, 255, 255))
    im.paste((220, 30, 30), (8, 8, 20, 20))
    return im


def blue_circle() -> Image.Image:
    from PIL import ImageDraw

    im = Image.new("RGB", (32, 32), (255, 255, 255))
    ImageDraw.Draw(im).ellipse((10, 10, 24, 24), fill=(30, 70, 220))
    return im


PROMPTS = ["a photo of a red circle", "a photo of two blue squares left of a green triangle"]


def test_shapes(model):
    cfg = model.config
    c = model.encode(PROMPTS, task="t2i")
    assert c.hidden.shape == (2, cfg.n_query, model.dit.config.caption_channels)
    assert c.mask.shape == (2, cfg.n_query) and bool(c.mask.all())
    ci = model.encode(["make the square blue"] * 2, images=[red_square(), blue_circle()], task="i2i")
    assert ci.hidden.shape == c.hidden.shape
    assert model.latent_shape == (8, 8, 8)  # the tiny DC-AE: f4, 8 channels
    x = torch.randn(2, *model.latent_shape)
    assert model.velocity(x, torch.tensor([0.3, 0.9]), c).shape == x.shape
    ref = model.encode_images([red_square()] * 2)
    assert model.velocity(x, torch.tensor(0.5), ci, ref_latents=ref).shape == x.shape


def test_encode_is_padding_invariant(model):
    """Left padding + explicit 3D positions: a prompt's conditioning does not depend on its batch mates."""
    with torch.no_grad():
        alone = model.encode(PROMPTS[:1]).hidden
        batched = model.encode(PROMPTS[:1] + ["a very long prompt " * 6]).hidden[:1]
        img_alone = model.encode(["what is it"], images=[red_square()], task="i2i").hidden
        img_batched = model.encode(["what is it", "x " * 30], images=[red_square(), None], task="i2i").hidden[:1]
    assert torch.allclose(alone, batched, atol=1e-5)
    assert torch.allclose(img_alone, img_batched, atol=1e-5)


def test_vision_tower_changes_conditioning(model):
    with torch.no_grad():
        a = model.encode(["what is it"], images=[red_square()], task="i2i").hidden
        b = model.encode(["what is it"], images=[blue_circle()], task="i2i").hidden
    assert not torch.allclose(a, b, atol=1e-4)


def _grads(model) -> dict[str, torch.Tensor | None]:
    return {n: p.grad for n, p in model.named_parameters()}


def test_dm_sft_gradients_reach_exactly_the_dm_side(model):
    trainable = model.set_trainable("dm_sft")
    with torch.no_grad():  # break the zero-init symmetry so ref_patch_embed can receive a gradient too
        model.ref_proj.weight.normal_(0, 0.02)
    x0 = model.encode_images([red_square(), blue_circle()])
    g = torch.Generator().manual_seed(0)
    c_t2i = model.encode(PROMPTS, task="t2i")
    c_i2i = model.encode(["make it blue"] * 2, images=[red_square(), blue_circle()], task="i2i")
    loss = flow_matching_loss(model, x0, c_t2i, generator=g, drop_text=0, drop_ref=0, drop_both=0)
    loss = loss + flow_matching_loss(
        model, x0, c_i2i, ref_latents=x0, generator=g, drop_text=0, drop_ref=0, drop_both=0
    )
    loss.backward()
    train_ids = {id(p) for p in trainable}
    groups = model.parameter_groups()
    assert {n for n, _ in groups["lm"] + groups["vision"]}.isdisjoint(
        {n for n, p in model.named_parameters() if id(p) in train_ids}
    )
    for name, p in model.named_parameters():
        if id(p) in train_ids:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
        else:
            assert p.grad is None, f"frozen {name} got a gradient"
    # the queries learned through the frozen LM
    assert model.t2i_queries.grad.abs().sum() > 0 and model.i2i_queries.grad.abs().sum() > 0


def test_lm_sft_gradients_reach_exactly_the_lm(model):
    trainable = model.set_trainable("lm_sft")
    loss = lm_loss(
        model,
        ["what shape is it?", "count the circles"],
        ["<think>a square</think><answer>square</answer>", "two"],
        images=[red_square(), None],
    )
    loss.backward()
    train_ids = {id(p) for p in trainable}
    vision = {n for n, _ in model.parameter_groups()["vision"]}
    for name, p in model.named_parameters():
        if id(p) in train_ids:
            # the vision merger and blocks all see the image; every LM weight sees the text
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
        else:
            assert p.grad is None, f"frozen {name} got a gradient"
    assert vision and vision <= {n for n, p in model.named_parameters() if id(p) in train_ids}


def test_zero_init_blocks_ref_patch_embed_gradient_at_step_zero(model):
    """At initialisation ref_proj is zero, so ref_patch_embed gets an exactly-zero gradient (ref_proj does not)."""
    model.set_trainable("edit")
    x0 = model.encode_images([red_square()])
    c = model.encode(["make it blue"], images=[red_square()], task="i2i")
    flow_matching_loss(model, x0, c, ref_latents=x0, drop_text=0, drop_ref=0, drop_both=0).backward()
    assert all(not p.grad.any() for p in model.ref_patch_embed.parameters())
    assert model.ref_proj.weight.grad.abs().sum() > 0
    assert model.t2i_queries.grad is None  # the edit mode trains only the i2i queries


def test_cfg_with_zeroed_conditioning_is_the_unconditional_branch(model):
    torch.manual_seed(1)
    model.config.sampling.cfg_schedule = "constant"  # the tiny profile's linear schedule: its own test below
    with torch.no_grad():
        c = model.encode(PROMPTS)
        x = torch.randn(2, *model.latent_shape)
        s = torch.tensor([0.7, 0.2])
        v_u = model.velocity(x, s, c.zeroed())
        v_c = model.velocity(x, s, c)
        assert torch.allclose(model.guided_velocity(x, s, c.zeroed(), cfg_scale=5.0), v_u, atol=1e-5)
        assert torch.allclose(model.guided_velocity(x, s, c, cfg_scale=3.0), v_u + 3.0 * (v_c - v_u), atol=1e-5)
        assert torch.equal(model.guided_velocity(x, s, c, cfg_scale=1.0), v_c)
        # editing: the triple form against separately computed branches
        ref = model.encode_images([red_square(), blue_circle()])
        with torch.no_grad():
            model.ref_proj.weight.normal_(0, 0.05)  # make the reference matter
        v_null = model.velocity(x, s, c.zeroed())
        v_ref = model.velocity(x, s, c.zeroed(), ref)
        v_txt = model.velocity(x, s, c, ref)
        want = v_null + 1.5 * (v_ref - v_null) + 4.0 * (v_txt - v_ref)
        got = model.guided_velocity(x, s, c, ref, cfg_scale=4.0, ref_cfg_scale=1.5)
        assert torch.allclose(got, want, atol=1e-5)
        assert not torch.allclose(v_ref, v_null, atol=1e-4)


def test_t2i_guidance_interval_guides_exactly_the_samples_at_or_below_cfg_max_sigma(model):
    torch.manual_seed(2)
    model.config.sampling.cfg_max_sigma, model.config.sampling.cfg_schedule = 0.5, "constant"
    with torch.no_grad():
        model.ref_proj.weight.normal_(0, 0.05)
        c = model.encode(PROMPTS)
        x = torch.randn(2, *model.latent_shape)
        s = torch.tensor([0.7, 0.2])  # the first sample is outside the interval, the second inside
        v_u, v_c = model.velocity(x, s, c.zeroed()), model.velocity(x, s, c)
        got = model.guided_velocity(x, s, c, cfg_scale=3.0)
        assert torch.allclose(got[0], v_c[0], atol=1e-6)
        assert torch.allclose(got[1], (v_u + 3.0 * (v_c - v_u))[1], atol=1e-5)
        # the same transitions one at a time (the rollout) give what the batch gives (the replay)
        for i in range(2):
            one = model.guided_velocity(x[i : i + 1], s[i : i + 1], c.index(slice(i, i + 1)), cfg_scale=3.0)
            assert torch.allclose(one, got[i : i + 1], atol=1e-5)
        # editing guides at every step, whatever the interval
        ref = model.encode_images([red_square(), blue_circle()])
        v_null, v_ref, v_txt = (model.velocity(x, s, c.zeroed()), model.velocity(x, s, c.zeroed(), ref),
                                model.velocity(x, s, c, ref))
        got = model.guided_velocity(x, s, c, ref, cfg_scale=4.0, ref_cfg_scale=1.5)
        assert torch.allclose(got, v_null + 1.5 * (v_ref - v_null) + 4.0 * (v_txt - v_ref), atol=1e-5)
        # DiT batch sizes: the unconditional pass runs only on the samples inside (none: skipped)
        calls = []
        hook = model.dit.register_forward_hook(lambda mod, args, out: calls.append(out[0].shape[0]))
        try:
            model.guided_velocity(x, s, c, cfg_scale=3.0)
            assert torch.equal(model.guided_velocity(x, torch.tensor(0.9), c, cfg_scale=3.0),
                               model.velocity(x, torch.tensor(0.9), c))
            model.guided_velocity(x, torch.tensor(0.3), c, cfg_scale=3.0)
        finally:
            hook.remove()
        assert calls == [2, 1, 2, 2, 4]
    model.config.sampling.cfg_max_sigma = 1.0
    with torch.no_grad():
        assert torch.allclose(model.guided_velocity(x, s, c, cfg_scale=3.0), v_u + 3.0 * (v_c - v_u), atol=1e-5)


def test_t2i_linear_cfg_schedule_weights_each_sample_by_its_sigma(model):
    torch.manual_seed(3)
    sampling = model.config.sampling
    sampling.cfg_schedule, sampling.cfg_max_sigma = "linear", 1.0
    with torch.no_grad():
        model.ref_proj.weight.normal_(0, 0.05)
        c3 = model.encode(PROMPTS + PROMPTS[:1])
        x = torch.randn(3, *model.latent_shape)
        s = torch.tensor([1.0, 0.6, 0.0])  # pure noise, mid-way, the clean end
        w = model.text_guidance_weight(s, 4.0)
        torch.testing.assert_close(w, torch.tensor([1.0, 1.0 + 3.0 * 0.4, 4.0]))
        v_u, v_c = model.velocity(x, s, c3.zeroed()), model.velocity(x, s, c3)
        got = model.guided_velocity(x, s, c3, cfg_scale=4.0)
        assert torch.allclose(got[0], v_c[0], atol=1e-6)  # weight 1 at pure noise: the conditional velocity
        torch.testing.assert_close(got, v_u + w.view(3, 1, 1, 1) * (v_c - v_u), rtol=0, atol=1e-5)
        for i in range(3):  # one transition at a time (the rollout) = the batch (the replay)
            one = model.guided_velocity(x[i : i + 1], s[i : i + 1], c3.index(slice(i, i + 1)), cfg_scale=4.0)
            torch.testing.assert_close(one, got[i : i + 1], rtol=0, atol=1e-5)
        # with the guidance interval as well, the samples above it are unguided
        sampling.cfg_max_sigma = 0.5
        assert model.text_guidance_weight(s, 4.0).tolist() == [1.0, 1.0, 4.0]
        # editing: the text term follows the schedule (no interval), w_ref stays constant
        ref = model.encode_images([red_square(), blue_circle(), red_square()])
        v_null, v_ref, v_txt = (model.velocity(x, s, c3.zeroed()), model.velocity(x, s, c3.zeroed(), ref),
                                model.velocity(x, s, c3, ref))
        got = model.guided_velocity(x, s, c3, ref, cfg_scale=4.0, ref_cfg_scale=1.5)
        want = v_null + 1.5 * (v_ref - v_null) + w.view(3, 1, 1, 1) * (v_txt - v_ref)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        # a scalar sigma weights the whole batch; CFG 1 is no guidance under either schedule
        assert torch.equal(model.guided_velocity(x, torch.tensor(0.9), c3, cfg_scale=1.0),
                           model.velocity(x, torch.tensor(0.9), c3))
    sampling.cfg_schedule, sampling.cfg_max_sigma = "constant", 1.0
    with pytest.raises(ValueError, match="cfg_schedule must be one of constant, linear, got 'cosine'"):
        type(sampling)(cfg_schedule="cosine")


def test_reference_path_is_identity_at_init(model):
    assert torch.equal(model.ref_patch_embed.proj.weight, model.dit.patch_embed.proj.weight)
    assert not model.ref_proj.weight.detach().any() and not model.ref_proj.bias.detach().any()
    with torch.no_grad():
        c = model.encode(PROMPTS)
        x = torch.randn(2, *model.latent_shape)
        s = torch.tensor([0.5, 0.5])
        ref = model.encode_images([red_square(), blue_circle()])
        plain = model.dit(
            hidden_states=x,
            encoder_hidden_states=c.hidden,
            timestep=1000 * s,
            encoder_attention_mask=c.mask,
            return_dict=False,
        )[0]
        assert torch.equal(model.velocity(x, s, c, ref), plain)
        assert torch.equal(model.velocity(x, s, c), plain)
        model.ref_proj.bias.fill_(0.1)
        assert not torch.allclose(model.velocity(x, s, c, ref), plain)


def test_save_load_round_trip_is_exact(model, tmp_path):
    with torch.no_grad():
        model.ref_proj.weight.normal_(0, 0.05)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = UnifiedModel.from_pretrained(tmp_path / "ckpt")
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert loaded.config == model.config and loaded.special == model.special
    with torch.no_grad():
        c, c2 = model.encode(PROMPTS), loaded.encode(PROMPTS)
        assert torch.equal(c.hidden, c2.hidden)
        x = torch.randn(2, *model.latent_shape)
        ref = model.encode_images([red_square(), blue_circle()])
        s = torch.tensor(0.4)
        assert torch.equal(model.velocity(x, s, c, ref), loaded.velocity(x, s, c2, ref))
    a = model.generate_images(PROMPTS[:1], steps=2, seed=3)[0]
    b = loaded.generate_images(PROMPTS[:1], steps=2, seed=3)[0]
    assert a.tobytes() == b.tobytes()
    assert model.generate_text(["hi"], max_new_tokens=5, seed=1) == loaded.generate_text(
        ["hi"], max_new_tokens=5, seed=1
    )
    # overwriting an existing checkpoint is atomic and leaves no temp directories behind
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_missing_or_corrupt_checkpoint_errors_name_the_path(model, tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        UnifiedModel.from_pretrained(tmp_path / "nope")
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors.*corrupt"):
        UnifiedModel.from_pretrained(ckpt)
    weights.unlink()
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        UnifiedModel.from_pretrained(ckpt)
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        UnifiedModel.from_pretrained(ckpt)
    (ckpt / "config.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(CheckpointError, match="not a unirl model config"):
        UnifiedModel.from_pretrained(ckpt)


def test_greedy_sampling_with_kv_cache_matches_full_recompute(model):
    """The cached loop (explicit rope positions, left padding, an image) equals argmax over full forwards."""
    prompts, images = ["what shape is it?", "a photo of a red circle and more words"], [red_square(), None]
    out = model.sample_text(prompts, images, max_new_tokens=6, temperature=0)
    for i in range(2):
        ids: list[int] = []
        for _ in range(len(out.completion_ids[i])):
            batch = model.build_inputs(prompts[i : i + 1], images[i : i + 1], suffix_ids=[ids])
            with torch.no_grad():
                ids.append(int(model.lm_logits(batch)[0, -1].argmax()))
        assert ids == out.completion_ids[i]


def test_next_token_draws_from_the_tempered_softmax_and_never_a_masked_token():
    """The inverse-CDF draw: token frequencies over 200k rows match softmax(logits / T) (standard error ~1e-3),
    top-k leaves the other tokens at frequency 0, temperature 0 is the argmax, one seed repeats the draw,
    and NaN logits raise instead of drawing token 0."""
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0, 0.5]]).repeat(200_000, 1)  # (N, V)
    for temperature, top_k in ((1.0, None), (0.5, None), (1.5, 3)):
        tok = next_token(logits, temperature, top_k, torch.Generator().manual_seed(1))  # (N,)
        freq = torch.bincount(tok, minlength=5).double() / len(tok)
        kept = logits[0].double() / temperature
        if top_k is not None:
            kept[kept.argsort(descending=True)[top_k:]] = float("-inf")
        expected = kept.softmax(-1)
        assert torch.allclose(freq, expected, atol=5e-3), (temperature, top_k, freq, expected)
        assert bool((freq[expected == 0] == 0).all())
    assert torch.equal(next_token(logits[:4], 0.0, None, None), torch.full((4,), 2))
    again = [next_token(logits[:64], 1.0, None, torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(*again)
    bad = logits[:2].clone()
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        next_token(bad, 1.0, None, None)


def test_group_prefill_samples_what_per_sample_prefill_samples(model):
    """``group_size`` G: the prompt prefilled once per group (KV cache repeated G times) gives the same tokens, at
    temperature 1 with one seed, as prefilling every sample's copy; a group whose samples differ is refused."""
    image = red_square()
    prompts = ["what shape is it?"] * 3 + ["a photo of a red circle and more words"] * 3
    images = [image] * 3 + [None] * 3
    kw = dict(max_new_tokens=8, temperature=1.0)
    flat = model.sample_text(prompts, images, generator=torch.Generator().manual_seed(5), **kw)
    grouped = model.sample_text(prompts, images, generator=torch.Generator().manual_seed(5), group_size=3, **kw)
    assert grouped.completion_ids == flat.completion_ids and grouped.texts == flat.texts
    assert len({tuple(c) for c in grouped.completion_ids[:3]}) > 1  # the G samples of a group are not copies
    with pytest.raises(ValueError, match="sample 1 does not share the prompt/image"):
        model.sample_text(["a", "b"], None, max_new_tokens=2, group_size=2)


def test_generate_text_stops_at_eos(model):
    """Teach one answer with lm_loss; greedy decoding then reproduces it and stops at <|im_end|>."""
    params = model.set_trainable("lm_sft")
    opt = torch.optim.Adam(params, lr=3e-3)
    prompt, answer = "what colour is the square?", "<think>the square is red</think><answer>red</answer>"
    for _ in range(60):
        loss = lm_loss(model, [prompt], [answer], images=[red_square()])
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = model.sample_text([prompt], [red_square()], max_new_tokens=40, temperature=0)
    assert out.texts == [answer]
    assert out.finished == [True] and out.completion_ids[0][-1] == model.special.eos
    assert model.special.eos not in out.completion_ids[0][:-1]
    capped = model.sample_text([prompt], [red_square()], max_new_tokens=3, temperature=0)
    assert len(capped.completion_ids[0]) == 3 and capped.finished == [False]


def test_sampling_is_seeded(model):
    a = model.generate_text(PROMPTS, max_new_tokens=8, temperature=1.0, top_k=20, seed=7)
    b = model.generate_text(PROMPTS, max_new_tokens=8, temperature=1.0, top_k=20, seed=7)
    assert a == b


def test_generate_images_sizes_and_seed(model):
    t2i = model.generate_images(PROMPTS, steps=3, seed=0)
    assert [im.size for im in t2i] == [(32, 32)] * 2 and all(im.mode == "RGB" for im in t2i)
    again = model.generate_images(PROMPTS, steps=3, seed=0)
    assert [im.tobytes() for im in t2i] == [im.tobytes() for im in again]
    edits = model.generate_images(["make it blue"], images=[red_square()], steps=3, seed=0)
    assert edits[0].size == (32, 32)
    with pytest.raises(ValueError, match="source images"):
        model.generate_images(["make it blue"], task="i2i", steps=1)


def test_images_latents_round_trip(model, tok):
    im = red_square()
    x = torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1.0  # (1, 3, 32, 32)
    # latent space (the tiny profile): the autoencoder's latents x scaling factor, decoded back through it
    model.vae.register_to_config(scaling_factor=0.5)
    lat = model.encode_images([im])
    assert lat.shape == (1, *model.latent_shape)
    torch.testing.assert_close(lat, model.vae.encode(x).latent * 0.5)
    dec = model.vae.decode(lat / 0.5).sample.clamp(-1, 1)  # (1, 3, 32, 32)
    expect = ((dec[0].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
    assert model.decode_latents(lat)[0].tobytes() == expect.tobytes()
    # pixel space (a profile without a VAE): the image itself, exactly
    cfg = load_model_config("tiny")
    cfg.vae.config = {}
    cfg.dit.config.update(in_channels=3, out_channels=3, sample_size=32, patch_size=4)
    pixel = UnifiedModel.build(cfg, tok)
    assert pixel.vae is None and pixel.latent_shape == (3, 32, 32)
    torch.testing.assert_close(pixel.encode_images([im]), x)
    assert pixel.decode_latents(pixel.encode_images([im]))[0].tobytes() == im.tobytes()


def test_deepcopy_keeps_an_independent_reference_path(model):
    ref_model = copy.deepcopy(model)
    with torch.no_grad():
        model.ref_proj.bias.fill_(0.5)
        c = ref_model.encode(PROMPTS[:1])
        x = torch.randn(1, *model.latent_shape)
        plain = ref_model.dit(
            hidden_states=x,
            encoder_hidden_states=c.hidden,
            timestep=torch.tensor([500.0]),
            encoder_attention_mask=c.mask,
            return_dict=False,
        )[0]
        # the copy's hook uses the copy's (still zero) ref_proj, not the original's
        assert torch.equal(ref_model.velocity(x, torch.tensor(0.5), c), plain)


def test_conditioning_helpers():
    c = Conditioning(torch.randn(2, 3, 4), torch.ones(2, 3, dtype=torch.long))
    assert torch.equal(c.keep(torch.tensor([1.0, 0.0])).hidden[1], torch.zeros(3, 4))
    assert torch.equal(c.keep(torch.tensor([1.0, 0.0])).hidden[0], c.hidden[0])
    assert len(Conditioning.cat([c, c.zeroed()])) == 4 and len(c.repeat_interleave(3)) == 6


def test_unknown_mode_and_task_are_clear_errors(model):
    with pytest.raises(ValueError, match="unknown training mode"):
        model.trainable_parameters("everything")
    with pytest.raises(ValueError, match="unknown task"):
        model.encode(PROMPTS, task="video")


def test_encode_with_prefix_ids_conditions_on_the_generated_text(model):
    """t2i_cot: the LM's own completion sits between the prompt and the queries."""
    prefix = model.inputs.encode_text("<think>two plus one</think><answer>three red circles</answer>")
    with torch.no_grad():
        plain = model.encode(PROMPTS[:1]).hidden
        with_prefix = model.encode(PROMPTS[:1], prefix_ids=[prefix]).hidden
    assert with_prefix.shape == plain.shape and not torch.allclose(plain, with_prefix, atol=1e-4)
    batch = model.build_inputs(PROMPTS[:1], suffix_ids=[prefix], n_query=4, query_id=model.special.t2i_query)
    assert batch.input_ids[0, -4 - len(prefix) : -4].tolist() == prefix


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_scheduler_sigmas(model, shift):
    from unirl.models.scheduler import FlowMatchEulerScheduler

    sig = FlowMatchEulerScheduler(shift).sigmas(4)
    s = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    assert torch.allclose(sig, shift * s / (1 + (shift - 1) * s))
    assert sig[0] == 1.0 and sig[-1] == 0.0 and bool((sig[1:] < sig[:-1]).all())


def test_euler_sampler_is_exact_for_a_point_mass():
    """With data = one point x0 the true velocity is (x - x0) / sigma; the Euler chain must land on x0."""
    from unirl.models.scheduler import FlowMatchEulerScheduler

    sched = FlowMatchEulerScheduler(3.0)
    x0 = torch.randn(2, 3, 4, 4)
    x = torch.randn(2, 3, 4, 4)
    sig = sched.sigmas(7)
    for k in range(7):
        x = sched.step(x, (x - x0) / sig[k], sig[k], sig[k + 1])
    assert torch.allclose(x, x0, atol=1e-5)
    assert torch.allclose(sched.add_noise(x0, x, torch.tensor([0.25, 0.25])), 0.75 * x0 + 0.25 * x)


def test_softmax_self_attention_option_survives_save_load(tok, tmp_path):
    from diffusers.models.attention_processor import AttnProcessor2_0

    cfg = load_model_config("tiny")
    cfg.dit_self_attention = "softmax"
    torch.manual_seed(0)
    soft = UnifiedModel.build(cfg, tok)
    assert all(isinstance(b.attn1.processor, AttnProcessor2_0) for b in soft.dit.transformer_blocks)
    soft.save_pretrained(tmp_path / "soft")
    loaded = UnifiedModel.from_pretrained(tmp_path / "soft")
    assert all(isinstance(b.attn1.processor, AttnProcessor2_0) for b in loaded.dit.transformer_blocks)
    torch.manual_seed(0)
    linear_cfg = load_model_config("tiny")
    linear_cfg.dit_self_attention = "linear"
    linear = UnifiedModel.build(linear_cfg, tok)
    with torch.no_grad():
        c = soft.encode(PROMPTS[:1])
        x = torch.randn(1, *soft.latent_shape)
        assert torch.equal(soft.velocity(x, torch.tensor(0.5), c), loaded.velocity(x, torch.tensor(0.5), c))
        assert not torch.allclose(soft.velocity(x, torch.tensor(0.5), c), linear.velocity(x, torch.tensor(0.5), c))
    cfg.dit_self_attention = "quadratic"
    with pytest.raises(ValueError, match="dit_self_attention"):
        UnifiedModel.build(cfg, tok)
