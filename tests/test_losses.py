"""SFT losses against independent computations."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from unirl.models import UnifiedModel, load_model_config
from unirl.models.tiny import tiny_tokenizer
from unirl.train.losses import dropout_masks, flow_matching_loss, lm_loss

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    tok = tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer")
    torch.manual_seed(0)
    m = UnifiedModel.build(load_model_config("tiny"), tok)
    with torch.no_grad():
        m.ref_proj.weight.normal_(0, 0.05)  # a non-trivial reference path
    return m.eval()


def images(n: int) -> list[Image.Image]:
    return [Image.new("RGB", (32, 32), (40 * i, 200 - 30 * i, 90)) for i in range(n)]


@pytest.mark.parametrize("with_ref", [False, True])
def test_flow_matching_loss_matches_the_formula(model, with_ref):
    B = 4
    x0 = model.encode_images(images(B))
    ref = model.encode_images(images(B)[::-1]) if with_ref else None
    with torch.no_grad():
        cond = model.encode(["a red circle"] * B, task="i2i" if with_ref else "t2i")
        got = flow_matching_loss(
            model,
            x0,
            cond,
            ref,
            generator=torch.Generator().manual_seed(5),
            drop_text=0.25,
            drop_ref=0.25,
            drop_both=0.25,
        )
        # the same draws, in the documented order: r, z, eps, eps_ref
        g = torch.Generator().manual_seed(5)
        r = torch.rand(B, generator=g)
        sigma = torch.sigmoid(torch.randn(B, generator=g))
        eps = torch.randn(x0.shape, generator=g)
        keep_t = torch.tensor([0.0 if (x < 0.25 or 0.5 <= x < 0.75) else 1.0 for x in r.tolist()])
        keep_r = torch.tensor([0.0 if 0.25 <= x < 0.75 else 1.0 for x in r.tolist()])
        s = sigma.view(B, 1, 1, 1)
        x_s = (1 - s) * x0 + s * eps
        ref_in = None
        if with_ref:
            ref_in = (0.8 * ref + 0.2 * torch.randn(ref.shape, generator=g)) * keep_r.view(B, 1, 1, 1)
        hidden = cond.hidden * keep_t.view(B, 1, 1)  # dropped text = zeroed connector output
        v = model.velocity(x_s, sigma, type(cond)(hidden, cond.mask), ref_in)
        want = ((v - (eps - x0)) ** 2).mean()
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("r,text,ref", [(0.01, 0, 1), (0.07, 1, 0), (0.12, 0, 0), (0.16, 1, 1), (0.99, 1, 1)])
def test_dropout_bands(r, text, ref):
    keep_text, keep_ref = dropout_masks(torch.tensor([r]), 0.05, 0.05, 0.05)
    assert (keep_text.item(), keep_ref.item()) == (text, ref)


def test_dropout_rates_are_five_percent_each():
    r = torch.rand(200_000, generator=torch.Generator().manual_seed(0))
    kt, kr = dropout_masks(r, 0.05, 0.05, 0.05)
    only_text = ((kt == 0) & (kr == 1)).float().mean()
    only_ref = ((kt == 1) & (kr == 0)).float().mean()
    both = ((kt == 0) & (kr == 0)).float().mean()
    for rate in (only_text, only_ref, both):
        assert abs(rate.item() - 0.05) < 0.003


def test_always_dropped_text_equals_the_unconditional_input(model):
    x0 = model.encode_images(images(2))
    with torch.no_grad():
        cond = model.encode(["a red circle", "a blue square"])
        a = flow_matching_loss(
            model, x0, cond, generator=torch.Generator().manual_seed(1), drop_text=1.0, drop_ref=0, drop_both=0
        )
        b = flow_matching_loss(
            model, x0, cond.zeroed(), generator=torch.Generator().manual_seed(1), drop_text=0, drop_ref=0, drop_both=0
        )
    assert torch.equal(a, b)


def test_lm_loss_is_cross_entropy_on_response_tokens_only(model):
    prompts = ["what colour is it?", "count the shapes please"]
    responses = ["<think>it is red</think><answer>red</answer>", "two"]
    ims = [images(1)[0], None]
    with torch.no_grad():
        got = lm_loss(model, prompts, responses, ims)
        total, n = 0.0, 0
        for p, r, im in zip(prompts, responses, ims):
            target = model.inputs.response_ids(r)
            assert target[-1] == model.special.eos
            batch = model.build_inputs([p], [im], suffix_ids=[target])  # the full sequence, no labels
            logp = model.lm_logits(batch)[0].log_softmax(-1)  # (L, V)
            L = batch.input_ids.shape[1]
            for j, t in enumerate(target):
                total -= logp[L - len(target) + j - 1, t].item()
                n += 1
    assert got.item() == pytest.approx(total / n, rel=1e-5)


def test_lm_loss_ignores_the_prompt(model):
    """Only the response tokens (and its EOS) carry labels; prompt and padding are -100."""
    target = model.inputs.response_ids("red")
    batch = model.build_inputs(["x " * 20, "y"], None, target_ids=[target, target])
    assert batch.labels[:, -len(target) :].tolist() == [target, target]
    assert (batch.labels[:, : -len(target)] == -100).all()
    assert batch.input_ids[:, -len(target) :].tolist() == [target, target]


def test_completion_logprobs_agree_with_lm_loss(model):
    prompts = ["what colour is it?", "count the shapes please"]
    responses = ["<think>it is red</think><answer>red</answer>", "two"]
    ims = [images(1)[0], None]
    completions = [model.inputs.response_ids(r) for r in responses]
    with torch.no_grad():
        logp, mask = model.completion_logprobs(prompts, completions, ims)
        loss = lm_loss(model, prompts, responses, ims)
    assert logp.shape == mask.shape == (2, max(len(c) for c in completions))
    assert mask.sum(1).tolist() == [len(c) for c in completions]
    assert (logp[mask == 0] == 0).all() and (logp[mask == 1] < 0).all()
    assert (-(logp.sum() / mask.sum())).item() == pytest.approx(loss.item(), rel=1e-5)
