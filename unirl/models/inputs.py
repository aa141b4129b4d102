"""LM inputs: chat-templated prompts (+ images) -> left-padded token batches for Qwen2.5-VL.

One sample is laid out as ``[pad...] <chat prompt with expanded image pads> [suffix ids] [target ids] [queries]``:

* the user turn goes through the tokenizer's chat template with the generation prompt
  (``<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n``); an image becomes
  ``<|vision_start|>`` + one ``<|image_pad|>`` per merged vision patch + ``<|vision_end|>``, the expansion the
  Qwen2.5-VL processor does (it is done here because that processor needs torchvision);
* ``suffix`` ids follow (e.g. the LM's own generated reasoning for ``t2i_cot``), then ``target`` ids (the response
  to learn, labels on these only), then ``n_query`` placeholder ids whose embeddings the model replaces with the
  task's learnable queries. Left padding keeps the queries (and the next token to generate) at the end.

Pixels go through transformers' PIL-backed ``Qwen2VLImageProcessorPil`` (resize to a multiple of patch x merge,
CLIP normalisation, the flattened patch layout the vision tower expects).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from unirl.models.tokenizer import IMAGE_PAD, SpecialTokens

IGNORE_INDEX = -100


@dataclass
class LMBatch:
    input_ids: torch.Tensor  # (B, L) left-padded
    attention_mask: torch.Tensor  # (B, L) 1 = real token
    mm_token_type_ids: torch.Tensor  # (B, L) 1 at image tokens, 0 elsewhere
    pixel_values: torch.Tensor | None = None  # (sum of patches, C * T * P * P)
    image_grid_thw: torch.Tensor | None = None  # (n_images, 3)
    labels: torch.Tensor | None = None  # (B, L) target ids, IGNORE_INDEX elsewhere

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> LMBatch:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = v.to(device=device, dtype=dtype if (dtype is not None and v.is_floating_point()) else None)
            out[f.name] = v
        return LMBatch(**out)


class InputBuilder:
    """Turns prompts, optional images and optional response ids into an :class:`LMBatch`."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, special: SpecialTokens, patch_size: int,
                 merge_size: int, temporal_patch_size: int, min_pixels: int, max_pixels: int) -> None:
        self.tokenizer = tokenizer
        self.special = special
        self.merge_size = merge_size
        self.image_processor = Qwen2VLImageProcessorPil(
            patch_size=patch_size, merge_size=merge_size, temporal_patch_size=temporal_patch_size,
            size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
        )

    def chat_prompt(self, prompt: str, with_image: bool = False) -> str:
        """The user turn plus the assistant header, with one (unexpanded) image placeholder if ``with_image``."""
        content: str | list[dict] = prompt
        if with_image:
            content = [{"type": "image"}, {"type": "text", "text": prompt}]
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def response_ids(self, response: str) -> list[int]:
        """Target ids of a response: its tokens followed by EOS (``<|im_end|>``)."""
        return self.encode_text(response) + [self.special.eos]

    def pixels(self, images: Sequence[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """(pixel_values (sum patches, C*T*P*P), image_grid_thw (n, 3)) for a list of images."""
        out = self.image_processor([im.convert("RGB") for im in images], return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"]

    def build(
        self,
        prompts: Sequence[str],
        images: Sequence[Image.Image | None] | None = None,
        suffix_ids: Sequence[Sequence[int]] | None = None,
        target_ids: Sequence[Sequence[int]] | None = None,
        n_query: int = 0,
        query_id: int | None = None,
    ) -> LMBatch:
        B = len(prompts)
        images = list(images) if images is not None else [None] * B
        for name, seq in (("images", images), ("suffix_ids", suffix_ids), ("target_ids", target_ids)):
            if seq is not None and len(seq) != B:
                raise ValueError(f"{name} has {len(seq)} entries for {B} prompts")
        if n_query and query_id is None:
            raise ValueError("n_query > 0 needs the query placeholder id")
        present = [im for im in images if im is not None]
        pixel_values = grid = None
        n_tokens: list[int] = []
        if present:
            pixel_values, grid = self.pixels(present)
            n_tokens = (grid.prod(-1) // self.merge_size**2).tolist()
        rows: list[list[int]] = []
        label_rows: list[list[int]] = []
        k = 0
        for i, prompt in enumerate(prompts):
            text = self.chat_prompt(prompt, with_image=images[i] is not None)
            if images[i] is not None:
                text = text.replace(IMAGE_PAD, IMAGE_PAD * n_tokens[k], 1)
                k += 1
            ids = self.encode_text(text)
            ids += list(suffix_ids[i]) if suffix_ids is not None else []
            labels = [IGNORE_INDEX] * len(ids)
            if target_ids is not None:
                ids += list(target_ids[i])
                labels += list(target_ids[i])
            ids += [query_id] * n_query if n_query else []
            labels += [IGNORE_INDEX] * n_query
            rows.append(ids)
            label_rows.append(labels)
        L = max(len(r) for r in rows)
        input_ids = torch.full((B, L), self.special.pad, dtype=torch.long)  # (B, L)
        attention_mask = torch.zeros(B, L, dtype=torch.long)  # (B, L)
        labels_t = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)  # (B, L)
        for i, (r, lab) in enumerate(zip(rows, label_rows)):
            input_ids[i, L - len(r):] = torch.tensor(r, dtype=torch.long)
            attention_mask[i, L - len(r):] = 1
            labels_t[i, L - len(lab):] = torch.tensor(lab, dtype=torch.long)
        mm_token_type_ids = (input_ids == self.special.image_pad).long()  # (B, L)
        return LMBatch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            mm_token_type_ids=mm_token_type_ids,
            pixel_values=pixel_values,
            image_grid_thw=grid,
            labels=labels_t if target_ids is not None else None,
        )
