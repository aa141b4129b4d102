"""Does the SFT DiT use what the prompt says? Class-swap and zeroed-conditioning losses of a trained model, one run.

    .venv/bin/python bench/sft_conditioning.py [--model data/models/sft] [--shards data/shards] [--n 96]

On held-out single-object t2i images (test split) it measures the flow-matching loss (the SFT loss: ``eps - x0``
target, MSE) with the same noise and sigma under three conditionings:

* ``right``: the image's own prompt;
* ``swapped``: the same prompt with the shape word replaced (circle -> square -> triangle -> circle);
* ``zeroed``: the zeroed connector output (the CFG unconditional branch).

per sigma band. A model that uses the shape word has ``swapped`` clearly above ``right``; a model that only uses
"there is one object" has ``swapped == right`` and ``zeroed`` above both. It also prints how far apart the
DiT's caption features (after its caption projection and norm, i.e. what cross-attention reads) are for prompts
that differ only in the shape word vs only in count/colour, relative to their norm. The last line is one JSON object
with ``class_swap_gap`` (mean relative loss increase right -> swapped), ``zeroed_gap`` (right -> zeroed),
``caption_shape_spread`` and ``caption_count_color_spread``.
"""

from __future__ import annotations

import argparse
import json
import re

SWAP = {"circle": "square", "square": "triangle", "triangle": "circle"}
BANDS = ((0.05, 0.3), (0.3, 0.6), (0.6, 0.85), (0.85, 0.98))


def swapped(prompt: str, cls: str) -> str | None:
    """``prompt`` with its (singular) shape word replaced, or None when the word is not in it exactly once."""
    if cls not in SWAP:
        return None
    out, n = re.subn(rf"\b{cls}\b", SWAP[cls], prompt)
    return out if n == 1 else None


def band_losses(model, x0, prompts: dict[str, list[str]], seeds: int = 4) -> dict[str, dict[str, float]]:
    import torch

    conds = {k: model.encode(v, None, "t2i") for k, v in prompts.items()}
    conds["zeroed"] = conds["right"].zeroed()
    out: dict[str, dict[str, float]] = {}
    for lo, hi in BANDS:
        sums = dict.fromkeys(conds, 0.0)
        for s in range(seeds):
            g = torch.Generator().manual_seed(s)
            eps = torch.randn(x0.shape, generator=g)  # (B, C, h, w)
            sigma = torch.empty(x0.shape[0]).uniform_(lo, hi, generator=g)  # (B,)
            xs = model.scheduler.add_noise(x0, eps, sigma)
            for k, c in conds.items():
                v = model.velocity(xs, sigma, c)
                sums[k] += float(((v - (eps - x0)) ** 2).mean()) / seeds
        out[f"{lo:.2f}-{hi:.2f}"] = sums
    return out


def caption_spread(model, prompts: list[str]) -> float:
    """Mean pairwise distance between the DiT caption features of ``prompts``, over their mean norm."""
    dit = model.dit
    e = dit.caption_norm(dit.caption_projection(model.encode(prompts, None, "t2i").hidden))  # (P, N, D_dit)
    d = (e[:, None] - e[None]).norm(dim=-1).mean(-1)  # (P, P), zero diagonal
    n = len(prompts)
    return float(d.sum() / (n * (n - 1))) / float(e.norm(dim=-1).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="data/models/sft")
    ap.add_argument("--shards", default="data/shards")
    ap.add_argument("--n", type=int, default=96, help="held-out single-object images")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    from unirl.models.unified import UnifiedModel
    from unirl.train.sft_data import read_split

    torch.set_num_threads(args.threads)
    model = UnifiedModel.from_pretrained(args.model).eval()
    rows = []
    for s in read_split(args.shards, "t2i", "test", 0.0, model.config.resolution):
        if s.meta["tag"] != "single_object":
            continue
        alt = swapped(s.meta["prompt"], s.meta["metadata"]["include"][0]["class"])
        if alt is not None:
            rows.append((s.images["png"], s.meta["prompt"], alt))
        if len(rows) == args.n:
            break
    if not rows:
        raise SystemExit(f"no single-object test prompts naming their shape in {args.shards}: run the curate stage")
    with torch.no_grad():
        x0 = model.encode_images([r[0] for r in rows])  # (B, C, h, w)
        losses = band_losses(model, x0, {"right": [r[1] for r in rows], "swapped": [r[2] for r in rows]})
        shape = caption_spread(model, [f"a photo of a {c}" for c in SWAP])
        other = caption_spread(model, ["a photo of a circle", "a photo of two circles", "a photo of a red circle",
                                       "a photo of four circles", "a photo of a blue circle"])
    print(f"{len(rows)} held-out single-object images from {args.shards}, model {args.model}")
    print(f"{'sigma band':>12} {'right':>9} {'swapped':>9} {'zeroed':>9}")
    for band, v in losses.items():
        print(f"{band:>12} {v['right']:9.4f} {v['swapped']:9.4f} {v['zeroed']:9.4f}")
    gap = sum(v["swapped"] / v["right"] - 1 for v in losses.values()) / len(losses)
    zgap = sum(v["zeroed"] / v["right"] - 1 for v in losses.values()) / len(losses)
    print(f"caption features, relative spread: shape word only {shape:.3f}; count/colour words {other:.3f}")
    print(json.dumps({"class_swap_gap": round(gap, 5), "zeroed_gap": round(zgap, 5),
                      "caption_shape_spread": round(shape, 4), "caption_count_color_spread": round(other, 4),
                      "n_images": len(rows)}))


if __name__ == "__main__":
    main()
