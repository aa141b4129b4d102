"""Image rewards against rendered Shapes scenes and independent computations; weighting and failures in combine."""

from __future__ import annotations

import io
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from unirl.data import tasks
from unirl.data.shapes import Obj, Scene, render
from unirl.rewards import RewardError, available, combine, get, register, unregister
from unirl.rewards import image as image_rewards

torch.set_num_threads(1)


def _edit_sample(tag: str, seed: int = 0) -> tasks.Sample:
    return tasks.generate("edit", random.Random(f"{tag}-{seed}"), 64, tag=tag)


def test_image_rewards_are_registered():
    names = {"geneval", "geneval_correct", "geneval_complete", "edit_correctness", "cycle_consistency",
             "jpeg_compressibility", "clip_similarity"}
    assert names <= set(available())


def test_geneval_rewards_score_t2i_samples_with_the_verifier():
    rng = random.Random(0)
    samples = [tasks.generate("t2i", rng, 64) for _ in range(6)]
    images = [s.images["png"] for s in samples]
    metas = [s.meta for s in samples]
    assert get("geneval")(images, [m["prompt"] for m in metas], metas) == [1.0] * 6
    assert get("geneval_correct")(images, [m["prompt"] for m in metas], metas) == [1.0] * 6
    blank = [Image.new("RGB", (64, 64), (255, 255, 255))] * 6
    assert get("geneval")(blank, [""] * 6, metas) == [0.0] * 6  # nothing drawn: every count term is 0
    with pytest.raises(ValueError, match="metadata\\[0\\]"):
        get("geneval")(images[:1], [""], [{"prompt": "no metadata"}])


def test_geneval_complete_gives_no_credit_for_leaving_a_requested_object_out():
    """Where every requested class is in the image it is the partial score; a missing class scores 0, whatever the
    partial score gives the objects that are there."""
    rng = random.Random(1)
    samples = [tasks.generate("t2i", rng, 64, tag=tag) for tag in ("two_object", "color_attr", "position", "counting")
               for _ in range(2)]
    metas = [s.meta for s in samples]
    prompts = [m["prompt"] for m in metas]
    full = [s.images["png"] for s in samples]
    assert get("geneval_complete")(full, prompts, metas) == get("geneval")(full, prompts, metas) == [1.0] * 8
    # keep only the first requested class: the partial score still pays for it, the complete one does not
    scenes = [Scene.from_dict(m["scene"]) for m in metas]
    first = [m["metadata"]["include"][0]["class"] for m in metas]
    kept = [render(Scene(tuple(o for o in sc.objects if o.shape == c)), 64) for sc, c in zip(scenes, first)]
    partial = get("geneval")(kept, prompts, metas)
    complete = get("geneval_complete")(kept, prompts, metas)
    for m, p, c in zip(metas, partial, complete):
        if len({r["class"] for r in m["metadata"]["include"]}) > 1:
            assert p > 0.0 and c == 0.0, (m["prompt"], p, c)
        else:  # counting: one class, a wrong number of it keeps the partial count term
            assert c == p
    # a counting image with one object too few: the class is there, so the partial count term stays
    count = next(s for s in samples if s.meta["tag"] == "counting")
    sc = Scene.from_dict(count.meta["scene"])
    fewer = render(Scene(sc.objects[1:]), 64)
    md = [count.meta]
    assert 0.0 < get("geneval_complete")([fewer], [""], md)[0] == get("geneval")([fewer], [""], md)[0] < 1.0


@pytest.mark.parametrize("tag", ["add", "remove", "recolor", "move", "resize"])
def test_edit_correctness_is_one_for_the_target_and_lower_for_the_unedited_source(tag):
    s = _edit_sample(tag)
    fn = get("edit_correctness")
    target, source = s.images["tgt.png"], s.images["src.png"]
    assert fn([target], [s.meta["prompt"]], [s.meta]) == [1.0]
    assert fn([source], [s.meta["prompt"]], [s.meta])[0] < 1.0
    terms = image_rewards.edit_terms(source, s.meta)
    assert ("size" in terms) == (tag == "resize") and ("exclude" in terms) == (tag in ("add", "remove"))
    if tag == "resize":
        assert terms["size"] == 0.0  # the unedited object has the old size


def test_edit_preservation_notices_a_moved_bystander():
    s = _edit_sample("recolor", seed=3)
    scene = Scene.from_dict(s.meta["scene"])
    if len(scene.objects) < 2:
        pytest.skip("this draw has no bystander")
    terms = image_rewards.edit_terms(render(scene, 64), s.meta)
    assert terms["preserve"] == 1.0
    o = scene.objects[1]
    moved = Scene(scene.objects[:1] + (Obj(o.shape, o.color, o.size, 1.0 - o.cx, 1.0 - o.cy),) + scene.objects[2:])
    far = math.hypot(1 - 2 * o.cx, 1 - 2 * o.cy) > image_rewards.PRESERVE_TOL
    if far:
        assert image_rewards.edit_terms(render(moved, 64), s.meta)["preserve"] < 1.0


def test_cycle_consistency_maps_psnr_to_unit_interval():
    src = tasks.generate("t2i", random.Random(1), 32).images["png"]
    x = np.asarray(src, dtype=np.float64)
    noisy = Image.fromarray(np.clip(x + np.random.default_rng(0).normal(0, 8, x.shape), 0, 255).astype(np.uint8))
    mse = np.mean((x - np.asarray(noisy, dtype=np.float64)) ** 2)
    expected = (10 * math.log10(255**2 / mse) - 10) / 30
    got = get("cycle_consistency")([src, noisy, Image.new("RGB", (32, 32))], ["", "", ""],
                                   [{"source_image": src}] * 3)
    assert got[0] == 1.0 and got[1] == pytest.approx(expected) and 0.0 <= got[2] < got[1]
    with pytest.raises(ValueError, match="source_image"):
        get("cycle_consistency")([src], [""], [{}])


def test_jpeg_compressibility_is_flow_grpo_formula():
    img = tasks.generate("t2i", random.Random(2), 64).images["png"]
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    assert get("jpeg_compressibility")([img], [""], [{}]) == [pytest.approx(-buf.tell() / 1000 / 500)]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    from unirl.models.tiny import tiny_tokenizer

    path = tmp_path_factory.mktemp("clip")
    tok = tiny_tokenizer(path)
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 32},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    CLIPModel(cfg).save_pretrained(path)
    return path


def test_clip_similarity_from_a_local_tiny_clip(clip_dir):
    from transformers import AutoTokenizer, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    imgs = [tasks.generate("t2i", random.Random(i), 48).images["png"] for i in range(2)]
    prompts = ["a photo of a red circle", "two blue squares"]
    image_rewards.OPTIONS.pop("clip_similarity", None)
    with pytest.raises(RewardError, match="clip_similarity.*model_path"):
        combine({"clip_similarity": 1.0}, imgs, prompts, [{}, {}])
    image_rewards.configure("clip_similarity", model_path=str(clip_dir))
    got = get("clip_similarity")(imgs, prompts, [{}, {}])
    # independent: transformers' own CLIP image processor (PIL backend) and the model's projection heads
    model = CLIPModel.from_pretrained(clip_dir).eval()
    proc = CLIPImageProcessorPil(size={"height": 32, "width": 32}, do_center_crop=False, resample=3)
    pixels = proc(imgs, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(image_rewards._clip_pixels(imgs, 32), pixels, rtol=0, atol=1e-5)
    text = AutoTokenizer.from_pretrained(clip_dir)(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=text["input_ids"], attention_mask=text["attention_mask"], pixel_values=pixels)
    expected = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds, dim=-1)
    assert got == pytest.approx(expected.tolist(), abs=1e-5)
    assert all(-1.0 <= v <= 1.0 for v in got)
    with pytest.raises(ValueError, match="unknown option"):
        image_rewards.configure("clip_similarity", model_dir="x")
    image_rewards.configure("clip_similarity", model_path=str(clip_dir / "missing"))
    with pytest.raises(RewardError, match="clip_similarity.*no CLIPModel"):
        combine({"clip_similarity": 1.0}, imgs, prompts, [{}, {}])
    image_rewards.OPTIONS.pop("clip_similarity", None)


def test_combine_weights_image_rewards_and_names_a_failing_one():
    s = [tasks.generate("t2i", random.Random(10 + i), 64) for i in range(2)]
    images = [s[0].images["png"], Image.new("RGB", (64, 64), (255, 255, 255))]
    metas = [x.meta for x in s]
    prompts = [m["prompt"] for m in metas]
    total, parts = combine({"geneval": 2.0, "jpeg_compressibility": 0.5}, images, prompts, metas)
    assert parts["geneval"] == [1.0, 0.0]
    assert total == pytest.approx([2.0 * g + 0.5 * j for g, j in zip(parts["geneval"], parts["jpeg_compressibility"])])

    @register("test_broken_image_reward")
    def broken(samples, prompts, metadata):
        raise KeyError("detector exploded")

    try:
        with pytest.raises(RewardError, match="test_broken_image_reward.*detector exploded"):
            combine({"geneval": 1.0, "test_broken_image_reward": 1.0}, images, prompts, metas)
    finally:
        unregister("test_broken_image_reward")
