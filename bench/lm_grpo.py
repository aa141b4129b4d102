"""LM GRPO throughput, side by side: ours (the ``understand`` scenario on the plain-torch engine) vs TRL's GRPOTrainer.

    .venv/bin/python bench/lm_grpo.py [--steps 6] [--prompts 4] [--group 8] [--max-new-tokens 32] [--beta 0.04]

Needs the ``bench`` extra (``trl``). Both sides run, in this one process and one after the other:

* the same tiny LM: ours is the text part of the tiny profile's Qwen2.5-VL LM (inside the unified model); TRL gets a
  plain ``Qwen2ForCausalLM`` built from the same text config with those exact weights copied (text-only M-RoPE with
  equal t/h/w positions is standard RoPE; the logits are checked equal before anything runs);
* the same prompts (Shapes arithmetic questions, chat-templated by the same tokenizer; the token ids are checked
  equal), the same reward functions (``answer_accuracy`` + ``format``), group size, completion length (EOS or the
  limit), temperature 1 without top-k/top-p, ``beta`` (k3 KL to a frozen reference, without TRL's importance-ratio
  "bias correction" of the KL gradient, as in the paper), PPO ``epsilon`` 0.2, the per-sequence-normalised loss
  (TRL ``loss_type="grpo"``), AdamW at the same learning rate, no gradient clipping, one update per rollout;
* steps/s is measured over the steps after the first (warm-up), with ``torch`` on ``--threads`` threads, in
  ``--rounds`` alternating (ours, TRL) rounds; the medians are reported.

First-step loss check (identical inputs): the same prompts and completions (sampled once by our model), the same
advantages and the same reference weights (the initial weights plus a fixed perturbation, so the KL term is not 0)
go through our ``lm_loss`` and TRL's own ``GRPOTrainer._compute_loss`` (with its reference log-probs computed by
its own ``_get_per_token_logps_and_entropies``); the losses and the gradients of the shared weights must agree.

The last line is one JSON object with ``ours_steps_per_s``, ``trl_steps_per_s``, ``speedup_vs_trl``,
``first_step_loss_ours``, ``first_step_loss_trl`` and ``first_step_loss_abs_diff``.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from unirl.data import tasks
from unirl.models.tiny import tiny_model
from unirl.models.unified import UnifiedModel
from unirl.rewards.text import answer_accuracy, format_reward
from unirl.rl.grpo import group_advantages
from unirl.rl.lm_policy import lm_loss, lm_rollout_from_samples, repeat_group
from unirl.rl.scenarios.understand import UnderstandScenario
from unirl.rl.trainer import RLConfig
from unirl.train.engine import EngineConfig, build_engine

REWARDS = {"answer_accuracy": 1.0, "format": 1.0}


# ------------------------------------------------------------------------------------------------ the shared LM
def text_lm_state(model: UnifiedModel) -> dict[str, torch.Tensor]:
    """Our LM's text weights under ``Qwen2ForCausalLM`` names (``model.language_model.*`` -> ``model.*``)."""
    return {k.replace("model.language_model.", "model."): v.detach().clone()
            for k, v in model.lm.state_dict().items() if not k.startswith("model.visual.")}


def qwen2_twin(model: UnifiedModel) -> torch.nn.Module:
    """A ``Qwen2ForCausalLM`` with our LM's text config and weights."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tc = model.lm.config.text_config
    cfg = Qwen2Config(
        vocab_size=tc.vocab_size, hidden_size=tc.hidden_size, intermediate_size=tc.intermediate_size,
        num_hidden_layers=tc.num_hidden_layers, num_attention_heads=tc.num_attention_heads,
        num_key_value_heads=tc.num_key_value_heads, max_position_embeddings=tc.max_position_embeddings,
        rms_norm_eps=tc.rms_norm_eps, hidden_act=tc.hidden_act,
        tie_word_embeddings=model.lm.config.tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": tc.rope_parameters["rope_theta"]},
        eos_token_id=model.special.eos, pad_token_id=model.special.pad, bos_token_id=None,
    )
    twin = Qwen2ForCausalLM(cfg)
    missing, unexpected = twin.load_state_dict(text_lm_state(model), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"weight names do not map: missing {missing}, unexpected {unexpected}")
    return twin.eval()


def check_same_lm(model: UnifiedModel, twin: torch.nn.Module, prompts: list[str]) -> float:
    """Max |logit difference| of the two LMs on the chat-templated prompts (left padding, attended tokens)."""
    batch = model.build_inputs(prompts)
    with torch.no_grad():
        ours = model.lm_logits(batch)
        theirs = twin(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return float((ours - theirs)[batch.attention_mask.bool()].abs().max())


def perturbed(model: UnifiedModel, scale: float, seed: int) -> UnifiedModel:
    """A frozen copy with ``scale * N(0, 1)`` added to every text weight (a reference that is not the policy)."""
    ref = copy.deepcopy(model).requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ref.lm.named_parameters():
            if not name.startswith("model.visual."):
                p.add_(scale * torch.randn(p.shape, generator=g))
    return ref


# ------------------------------------------------------------------------------------------------ prompts, reward
def make_prompts(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{**s.meta, "images": {}} for s in (tasks.generate("understand", rng, 32, tag="arithmetic")
                                                for _ in range(n))]


def trl_reward(prompts, completions, answer, **kwargs) -> list[float]:
    """Our ``answer_accuracy`` + ``format`` on TRL's conversational completions (the same functions, weights 1)."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    metas = [{"answer": a} for a in answer]
    acc = answer_accuracy(texts, [""] * len(texts), metas)
    fmt = format_reward(texts, [""] * len(texts), metas)
    return [a + f for a, f in zip(acc, fmt)]


# ------------------------------------------------------------------------------------------------ ours
def run_ours(model: UnifiedModel, prompts: list[dict], args: argparse.Namespace) -> dict[str, float]:
    cfg = RLConfig(scenario="understand", group_size=args.group, prompts_per_step=args.prompts,
                   temperature=1.0, max_new_tokens=args.max_new_tokens, beta_lm=args.beta, clip_eps_lm=0.2,
                   lr_lm=args.lr, rewards=REWARDS, engine=EngineConfig(grad_clip=0.0), tracking=False)
    scenario = UnderstandScenario(cfg)
    ref = copy.deepcopy(model).requires_grad_(False).eval()
    engine = build_engine(model, scenario.param_groups(model), cfg.engine)
    times, lengths = [], []
    for step in range(args.steps):
        batch = [prompts[(step * args.prompts + i) % len(prompts)] for i in range(args.prompts)]
        t0 = time.perf_counter()
        with torch.no_grad():
            rollout = scenario.rollout(model, ref, batch, args.group, torch.Generator().manual_seed(step))
        rewards, _ = scenario.score(rollout)
        adv = scenario.advantages(rewards, args.group)
        loss, _ = scenario.loss(model, ref, rollout, adv, 0)
        engine.backward(loss)
        engine.step()
        times.append(time.perf_counter() - t0)
        lengths.append(float(rollout.lm.mask.sum(1).mean()))
    timed = times[1:] or times
    return {"steps_per_s": len(timed) / sum(timed), "completion_len": sum(lengths) / len(lengths)}


# ------------------------------------------------------------------------------------------------ TRL
def trl_trainer(path: Path, tok, prompts: list[dict], args: argparse.Namespace, out: Path, steps: int):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    rows = [{"prompt": [{"role": "user", "content": p["prompt"]}], "answer": p["answer"]} for p in prompts]
    config = GRPOConfig(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=args.prompts * args.group,
        gradient_accumulation_steps=1, num_generations=args.group, max_completion_length=args.max_new_tokens,
        temperature=1.0, top_p=1.0, top_k=0, beta=args.beta, epsilon=0.2, loss_type="grpo", scale_rewards="group",
        use_bias_correction_kl=False,  # the paper's plain k3 KL gradient, as ours (TRL 1.x defaults to True)
        num_iterations=1, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=0.0, optim="adamw_torch",
        use_cpu=True, bf16=False, report_to="none", save_strategy="no", logging_steps=10**6, disable_tqdm=True,
        seed=0, shuffle_dataset=False, log_completions=False, dataloader_num_workers=0,
    )
    return GRPOTrainer(model=str(path), reward_funcs=[trl_reward], args=config,
                       train_dataset=Dataset.from_list(rows), processing_class=tok)


def run_trl(trainer) -> dict[str, float]:
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.marks: list[float] = []
            self.logs: dict = {}

        def on_train_begin(self, args, state, control, **kwargs):
            self.marks = [time.perf_counter()]

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs |= logs or {}

    clock = Clock()
    trainer.add_callback(clock)
    trainer.train()
    gaps = [b - a for a, b in zip(clock.marks, clock.marks[1:])]
    timed = gaps[1:] or gaps
    return {"steps_per_s": len(timed) / sum(timed),
            "completion_len": float(clock.logs.get("completions/mean_length", float("nan")))}


# ------------------------------------------------------------------------------------------------ loss check
def first_step_check(model: UnifiedModel, trainer, prompts: list[dict], args: argparse.Namespace) -> dict:
    """Our ``lm_loss`` vs TRL's ``_compute_loss`` on identical inputs (see the module docstring)."""
    G, sp = args.group, model.special
    texts = repeat_group([p["prompt"] for p in prompts[:2]], G)
    samples = model.sample_text(texts, max_new_tokens=args.max_new_tokens, temperature=1.0,
                                generator=torch.Generator().manual_seed(123))
    ref = perturbed(model, 0.02, seed=7)
    adv = group_advantages(torch.randn(len(texts), generator=torch.Generator().manual_seed(5)), G)
    policy = copy.deepcopy(model)
    policy.set_trainable("lm")
    rollout = lm_rollout_from_samples(policy, ref, texts, None, samples, temperature=1.0, beta=args.beta)
    ours, _ = lm_loss(policy, rollout, adv, clip_eps=0.2, beta=args.beta)
    ours.backward()

    # TRL: the same prompt ids (its own chat templating), completion ids, mask and advantages
    tok = trainer.processing_class
    prompt_ids = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                          tokenize=True, return_dict=True)["input_ids"] for t in texts]
    for t, ids in zip(texts, prompt_ids):
        if ids != model.inputs.encode_text(model.inputs.chat_prompt(t)):
            raise RuntimeError(f"TRL and unirl tokenise the chat prompt {t!r} differently")
    P = max(len(x) for x in prompt_ids)
    prompt_t = torch.tensor([[sp.pad] * (P - len(x)) + x for x in prompt_ids])  # (B, P) left-padded
    prompt_mask = torch.tensor([[0] * (P - len(x)) + [1] * len(x) for x in prompt_ids])  # (B, P)
    comp_t, comp_mask = rollout.completion_ids, rollout.mask.long()  # (B, L) right-padded, mask to first EOS
    trl_ref = trainer.ref_model  # TRL's own reference (fused log-prob head), given the perturbed weights
    missing, unexpected = trl_ref.load_state_dict(text_lm_state(ref), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"reference weights do not map: missing {missing}, unexpected {unexpected}")
    input_ids = torch.cat([prompt_t, comp_t], 1)  # (B, P + L)
    attn = torch.cat([prompt_mask, comp_mask], 1)  # (B, P + L)
    with torch.no_grad():
        ref_logps = trainer._get_per_token_logps_and_entropies(trl_ref, input_ids, attn, comp_t.shape[1])[0]
    inputs = {"prompt_ids": prompt_t, "prompt_mask": prompt_mask, "completion_ids": comp_t,
              "completion_mask": comp_mask, "advantages": adv, "ref_per_token_logps": ref_logps,
              "num_items_in_batch": comp_mask.sum()}
    if not hasattr(trainer, "current_gradient_accumulation_steps"):
        trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    trainer.model.zero_grad()
    theirs = trainer._compute_loss(trainer.model, inputs)
    theirs.backward()
    ours_grads = {k.replace("model.language_model.", "model."): p.grad for k, p in policy.lm.named_parameters()
                  if p.grad is not None}
    shared = [(p.grad, ours_grads[k]) for k, p in trainer.model.named_parameters()
              if p.grad is not None and k in ours_grads]
    grad_diff = max(float((a - b).abs().max()) for a, b in shared)
    grad_scale = max(float(b.abs().max()) for _, b in shared)
    trainer.model.zero_grad()
    return {"first_step_loss_ours": float(ours.detach()), "first_step_loss_trl": float(theirs.detach()),
            "first_step_loss_abs_diff": abs(float(ours.detach()) - float(theirs.detach())),
            "first_step_grad_max_abs_diff": grad_diff, "first_step_grad_max_abs": grad_scale,
            "first_step_kl_ours": float(_kl(rollout, policy))}


def _kl(rollout, policy) -> float:
    _, stats = lm_loss(policy, rollout, torch.zeros(len(rollout)), clip_eps=0.2, beta=1.0)
    return stats["kl"]


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="GRPO steps per side (the first is warm-up)")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--group", type=int, default=8, help="completions per prompt (G)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2, help="alternating (ours, TRL) measurements; medians")
    args = parser.parse_args()
    if args.steps < 2 or args.rounds < 1:
        parser.error("--steps must be >= 2 (the first is warm-up) and --rounds >= 1")
    torch.set_num_threads(args.threads)
    import transformers
    import trl

    out: dict[str, object] = {"trl_version": trl.__version__, "transformers_version": transformers.__version__,
                              "steps": args.steps, "prompts": args.prompts, "group": args.group,
                              "max_new_tokens": args.max_new_tokens, "beta": args.beta, "threads": args.threads}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model = tiny_model(tmp / "work", seed=0)
        prompts = make_prompts(64, seed=0)
        twin = qwen2_twin(model)
        out["logit_max_abs_diff"] = check_same_lm(model, twin, [p["prompt"] for p in prompts[:8]])
        twin.save_pretrained(tmp / "qwen2")
        model.tokenizer.save_pretrained(tmp / "qwen2")

        check_trainer = trl_trainer(tmp / "qwen2", model.tokenizer, prompts, args, tmp / "trl_check", 1)
        out.update(first_step_check(model, check_trainer, prompts, args))
        del check_trainer
        print(f"same LM: max |logit diff| {out['logit_max_abs_diff']:.2e}; first-step loss ours "
              f"{out['first_step_loss_ours']:.8f} TRL {out['first_step_loss_trl']:.8f} "
              f"(|diff| {out['first_step_loss_abs_diff']:.2e}, max |grad diff| "
              f"{out['first_step_grad_max_abs_diff']:.2e} of max |grad| {out['first_step_grad_max_abs']:.2e}, "
              f"KL to the perturbed reference "
              f"{out['first_step_kl_ours']:.4f})", flush=True)

        # alternate the two sides so that load from other processes hits both alike; report the medians
        runs: dict[str, list[dict[str, float]]] = {"ours": [], "trl": []}
        for r in range(args.rounds):
            runs["ours"].append(run_ours(copy.deepcopy(model), prompts, args))
            trainer = trl_trainer(tmp / "qwen2", model.tokenizer, prompts, args, tmp / f"trl_run{r}", args.steps)
            runs["trl"].append(run_trl(trainer))
            del trainer
            print(f"round {r}: ours {runs['ours'][-1]['steps_per_s']:.3f} steps/s (mean completion "
                  f"{runs['ours'][-1]['completion_len']:.1f} tokens), TRL {runs['trl'][-1]['steps_per_s']:.3f} "
                  f"steps/s (mean completion {runs['trl'][-1]['completion_len']:.1f} tokens)", flush=True)
    ours, theirs = (statistics.median(x["steps_per_s"] for x in runs[k]) for k in ("ours", "trl"))
    out.update(ours_steps_per_s=round(ours, 4), trl_steps_per_s=round(theirs, 4),
               speedup_vs_trl=round(ours / theirs, 3),
               ours_completion_len=statistics.mean(x["completion_len"] for x in runs["ours"]),
               trl_completion_len=statistics.mean(x["completion_len"] for x in runs["trl"]))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
