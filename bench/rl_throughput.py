"""RL step throughput (issue 25): one GRPO step of sid (`python -m sid.rl`'s step) and of a TRL-style torch
baseline on the same prompts, each in its own process, in one run.

A step, on both sides, is MiniOneRec's recipe (docs/rl.md): P MiniOneRec Industrial test prompts, a rollout of G
trie-constrained beams each (group = beams, length_penalty 0), `ranking` rewards and group advantages on the host,
the reference model's log-probs of the P x G completions (once per rollout), then one AdamW update (lr 1e-5, clip
0.3) on the GRPO loss (beta 1e-3) over the P x G completions in --accum micro-batches. The same P prompts are rolled out
every step. Each side runs one untimed step first (it compiles; first_step_s), --warmup more, then --steps timed
steps, each split into rollout, host (rewards, advantages, rows), reference log-probs and update.

sid: `sid.rl.source.RolloutSource` (`sid.eval.beam.sharded_beam_search`, `score_groups`, `group_rows`, jitted
`completion_logprobs` of a copy of the initial policy) and `sid.step.make_train_step` with
`sid.rl.loss.make_loss_fn`, jitted and donated, as `sid.trainer.fit` runs them; prompts left-padded to their
eval bucket (128). sid's reference pass and update run each prompt once with its G completions beside it, packed
several to a row where they fit (`group_rows`); the baseline repeats the prompt in each of its P x G rows, as TRL does.

Baseline: `transformers.Qwen2ForCausalLM` of the same architecture (random init; sid's initial weights with
--same-weights), bf16 on a GPU and f32 on a CPU, policy and a frozen reference copy. Rollout: one
`generate(num_beams=G, num_return_sequences=G, length_penalty=0, max_new_tokens=depth + 2)` over the P prompts
with the upstream-style Python-loop constraint (bench/common.py). Reference log-probs: a no-grad forward per
micro-batch (`logits_to_keep`, as TRL). Update: a forward and backward per micro-batch with upstream's loss,
`clip_grad_norm_`, torch AdamW (fused on a GPU). The ratio is the baseline's step time over sid's.

With --same-weights (on with --tiny) the sid child exports its initial model and its first rollout's rows; the
baseline loads both and reports how far its reference log-probs of sid's rows are from sid's (the GRPO loss value
itself is 0 at every first update: ratio 1, centred advantages, no KL yet; tests/test_bench.py checks the baseline's
loss and gradient against `sid.rl.loss.grpo_loss`).

    python bench/rl_throughput.py --out runs/bench/rl_throughput.json           # GPU: 1.5B, 64 prompts x 16
    python bench/rl_throughput.py --tiny --out /tmp/rl_tiny.json                # CPU smoke
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import (
    arch_config,
    cuda_available,
    hf_qwen2_config,
    host_environment,
    jax_environment,
    jax_memory,
    load_prompts,
    markdown_table,
    run_child,
    serve_child,
    upstream_constraint,
    write_json,
)

BETA = 1e-3  # upstream's rl.sh
LEARNING_RATE = 1e-5  # upstream's rl.sh (constant here: speed does not depend on it)
CLIP_NORM = 0.3  # upstream's max_grad_norm
PARTS = ("rollout_s", "host_s", "ref_logprobs_s", "update_s")
FIRST_BATCH = "first_batch.npz"  # --same-weights: sid's first rollout rows, beside its exported model


def timed(fn, split: dict[str, float], key: str):
    """`fn` whose calls wait for their result and add their seconds to `split[key]`."""
    import jax

    def call(*args):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        split[key] += time.perf_counter() - t0
        return out

    return call


class SidStep:
    """sid's RL step as `python -m sid.rl` runs it: RolloutSource's batch, then the jitted donated update."""

    def __init__(self, spec: dict[str, Any]):
        import equinox as eqx

        from sid.config import MeshConfig
        from sid.eval.config import EvalConfig
        from sid.eval.runner import catalog_trie
        from sid.models.build import build_model
        from sid.parallel.mesh import make_mesh
        from sid.rl.__main__ import prompt_length
        from sid.rl.config import RLConfig
        from sid.rl.loss import make_loss_fn
        from sid.rl.source import RolloutSource

        self.spec, self.mesh = spec, make_mesh(MeshConfig())
        tok, catalog, prompts, targets = load_prompts(spec, spec["prompts"])
        cfg = arch_config(
            spec["arch"],
            seed=spec["seed"],
            compute_dtype=spec["dtype"],
            remat=spec["remat"],
            attention=spec["attention"],
        )
        model, _ = build_model(cfg, tok)
        if spec["weights_dir"]:
            from sid.compat.hf import export_qwen2

            export_qwen2(model, Path(spec["weights_dir"]) / "model")
        rl = RLConfig(
            group_size=spec["group"],
            prompts_per_step=spec["prompts"],
            rollout="beam",
            reward="ranking",
            loss="grpo",
            beta=BETA,
        )
        # Built before the train state, as sid.rl does: its reference is a copy of the initial policy.
        self.source = RolloutSource(
            trie=catalog_trie(tok, catalog),
            prompts=prompts,
            targets=targets,
            start=model,
            cfg=rl,
            mesh=self.mesh,
            seed=spec["seed"],
            pad_id=tok.pad_id,
            prompt_length=prompt_length(prompts, EvalConfig().prompt_buckets),
            run_dir=Path(tempfile.gettempdir()),  # a frozen reference (no sync) writes nothing there
            micro_batches=spec["accum"],
        )
        self.prompt_width = self.source.ids.shape[1]
        self._init_update(model, make_loss_fn(beta=BETA, kind="grpo"))
        self.source.attach(lambda: eqx.combine(self.state.params, self.static))
        self.split = self._time_source()

    def _init_update(self, model, loss_fn) -> None:
        from sid.optim.config import OptimizerConfig
        from sid.optim.schedule import make_schedule
        from sid.step import init_state, make_train_step

        lr = make_schedule(LEARNING_RATE, warmup_steps=0, total_steps=1, kind="constant", min_lr_ratio=1.0)
        optimizer = OptimizerConfig(name="adamw").build(learning_rate=lr, aux_learning_rate=lr, clip_norm=CLIP_NORM)
        self.state, self.static, sharding = init_state(model, optimizer, seed=self.spec["seed"], mesh=self.mesh)
        self.step_fn = make_train_step(
            self.static,
            loss_fn,
            optimizer,
            accum=self.spec["accum"],
            mesh=self.mesh,
            state_sharding=sharding,
            lr_schedule=lr,
        )
        self.compiled = None

    def _time_source(self) -> dict[str, float]:
        """Wrap the source's two device programs so that each step's split can tell them from its host work."""
        split = {"rollout_s": 0.0, "ref_logprobs_s": 0.0}
        for attr, key in (("rollout", "rollout_s"), ("ref_logprobs", "ref_logprobs_s")):
            if not callable(getattr(self.source, attr, None)):
                raise RuntimeError(f"RolloutSource has no {attr}() to time: update bench/rl_throughput.py's split")
            setattr(self.source, attr, timed(getattr(self.source, attr), split, key))
        return split

    def step(self) -> dict[str, Any]:
        import jax

        from sid.parallel.host import to_global
        from sid.rl.loss import rl_step_stats

        self.split.update(rollout_s=0.0, ref_logprobs_s=0.0)
        t0 = time.perf_counter()
        host = next(self.source)
        # cells x rows: the same every step (the same prompts), so one compile
        self.packed_rows = int(np.prod(host["input_ids"].shape[:2]))
        batch = to_global(host, self.mesh)
        t1 = time.perf_counter()
        if self.compiled is None:  # the first step: also keep its rows for the baseline's cross-check
            self.compiled = self.step_fn.lower(self.state, batch).compile()
            if self.spec["weights_dir"]:
                keep = ("input_ids", "segment_ids", "token_index", "completions", "completion_mask", "ref_logp")
                np.savez(Path(self.spec["weights_dir"]) / FIRST_BATCH, **{k: host[k] for k in keep})
        self.state, metrics = self.compiled(self.state, batch)
        metrics = jax.device_get(metrics)
        t2 = time.perf_counter()
        stats = rl_step_stats(metrics)
        return {
            **self.split,
            "host_s": t1 - t0 - self.split["rollout_s"] - self.split["ref_logprobs_s"],
            "update_s": t2 - t1,
            "step_s": t2 - t0,
            "rows": int(host["completion_mask"].any(axis=-1).sum()),  # completions, as the baseline's rows
            "completion_tokens": int(host["completions"].shape[-1]),
            "loss": float(metrics["loss"]),
            "reward_mean": stats["rollout/reward_mean"],
            "kl": stats["kl"],
        }


def run_steps(step, spec: dict[str, Any]) -> dict[str, Any]:
    """The first (compiling) step, --warmup untimed ones, then the mean split of --steps timed steps."""
    first = step()
    for _ in range(spec["warmup"]):
        step()
    timed_steps = [step() for _ in range(spec["steps"])]
    mean = {k: statistics.fmean(s[k] for s in timed_steps) for k in (*PARTS, "step_s")}
    last = timed_steps[-1]
    return {
        **mean,
        "first_step_s": first["step_s"],
        "step_s_all": [s["step_s"] for s in timed_steps],
        **{k: last[k] for k in ("rows", "completion_tokens", "loss", "reward_mean", "kl")},
    }


def measure_sid(spec: dict[str, Any]) -> dict[str, Any]:
    import jax

    spec = dict(spec, dtype=resolve_dtype(spec["dtype"], jax.default_backend() != "cpu"))
    rl = SidStep(spec)
    out = run_steps(rl.step, spec)
    memory = jax_memory(rl.compiled)
    return {
        **spec,
        **jax_environment(),
        **out,
        "prompt_width": rl.prompt_width,
        "packed_rows": rl.packed_rows,
        **memory,
    }


def resolve_dtype(dtype: str, accelerator: bool) -> str:
    """--dtype auto: bfloat16 on an accelerator, float32 on a CPU (where bf16 matmuls are emulated)."""
    return dtype if dtype != "auto" else ("bfloat16" if accelerator else "float32")


def torch_grpo_loss(logp, ref_logp, advantages, mask, beta: float):
    """Upstream's (TRL-style) GRPO loss per completion [rows]: per token -(exp(logp - sg(logp)) A - beta KL_k3),
    averaged over each completion's tokens; the step averages these over its completions."""
    import torch

    d = ref_logp - logp
    kl = torch.exp(d) - d - 1
    per_token = -(torch.exp(logp - logp.detach()) * advantages[:, None] - beta * kl)
    return (per_token * mask).sum(dim=1) / mask.sum(dim=1)


def separate_rows(batch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """sid's rows (`sid.rl.rollout.group_rows`: each prompt once with its G completions, several prompts to a row)
    as the baseline's: each prompt, left-padded to the longest, repeated before each of its completions, [P * G,
    prompt + T] ids and attention mask; and sid's reference log-probs [P, G, T] in the same order of groups."""
    from sid.rl.source import left_pad

    groups = batch["completion_mask"].any(axis=(2, 3))  # [cells, group slots]: the slots that hold a group
    group, num_tokens = batch["completions"].shape[2:]
    prompts = []
    for c, j in zip(*np.nonzero(groups), strict=True):
        row, last = divmod(int(batch["token_index"][c, j, 0, 0]), batch["input_ids"].shape[2])  # the prompt's last
        segments = batch["segment_ids"][c, row]
        prompts.append(batch["input_ids"][c, row][segments == segments[last]].tolist())
    ids, mask = (np.repeat(a, group, axis=0) for a in left_pad(prompts, max(map(len, prompts)), 0))
    ids = np.concatenate([ids, batch["completions"][groups].reshape(-1, num_tokens)], axis=1)
    return ids, np.concatenate([mask, np.ones((len(ids), num_tokens), bool)], axis=1), batch["ref_logp"][groups]


def torch_completion_logprobs(model, ids, mask, num_tokens: int, valid_vocab: int):
    """f32 log-probs of each row's last `num_tokens` tokens over the valid vocab, as TRL's per-token log-probs
    (`logits_to_keep`), with positions that skip the left padding (as sid's)."""
    import torch

    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    logits = model(
        input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=num_tokens + 1, use_cache=False
    ).logits
    logp = torch.log_softmax(logits[:, :-1, :valid_vocab].float(), dim=-1)
    return logp.gather(-1, ids[:, -num_tokens:, None]).squeeze(-1)


class TorchStep:
    """The TRL-style baseline's step: HF generate with the upstream constraint, rewards, reference forward, update."""

    def __init__(self, spec: dict[str, Any]):
        import torch

        self.spec = spec
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.dtype = getattr(torch, resolve_dtype(spec["dtype"], self.device == "cuda"))
        tok, catalog, prompts, self.targets = load_prompts(spec, spec["prompts"])
        self.constraint, self.sid_of_path, self.depth = upstream_constraint(tok, catalog)
        self.valid_vocab, self.num_tokens = tok.vocab_size, self.depth + 2  # "\n" and EOS end every completion
        width = max(len(p) for p in prompts)
        self.ids = torch.tensor([[tok.pad_id] * (width - len(p)) + p for p in prompts], device=self.device)
        self.mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        self._init_models(tok)

    def _init_models(self, tok) -> None:
        import copy

        import torch
        import transformers

        torch.manual_seed(self.spec["seed"])
        if self.spec["weights_dir"]:
            self.policy = transformers.Qwen2ForCausalLM.from_pretrained(Path(self.spec["weights_dir"]) / "model")
        else:
            rows = -(-tok.vocab_size // 128) * 128
            self.policy = transformers.Qwen2ForCausalLM(hf_qwen2_config(arch_config(self.spec["arch"]), rows))
        self.policy.to(self.device, self.dtype)
        self.ref = copy.deepcopy(self.policy).eval().requires_grad_(False)
        if self.spec["remat"] != "none":  # transformers 5 renamed gradient_checkpointing_enable (which now warns)
            (
                getattr(self.policy, "activation_checkpointing_enable", None)
                or self.policy.gradient_checkpointing_enable
            )()
        self.optimizer = torch.optim.AdamW(
            self.policy.parameters(),
            lr=LEARNING_RATE,
            betas=(0.9, 0.95),
            eps=1e-8,
            weight_decay=0.0,
            fused=self.device == "cuda",
        )
        self.generation = transformers.GenerationConfig(
            num_beams=self.spec["group"],
            num_return_sequences=self.spec["group"],
            length_penalty=0.0,
            do_sample=False,
            max_new_tokens=self.num_tokens,
            pad_token_id=tok.pad_id,
            eos_token_id=tok.eos_id,
        )

    def sync(self) -> float:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def rollout(self):
        """[P * G, width + T] prompt + completion rows (each prompt's G beams best first) and their mask."""
        import torch
        import transformers

        self.policy.eval()
        with torch.no_grad():
            out = self.policy.generate(
                self.ids,
                attention_mask=self.mask,
                generation_config=self.generation,
                logits_processor=transformers.LogitsProcessorList([self.constraint(self.ids.shape[1])]),
            )
        if out.shape[1] != self.ids.shape[1] + self.num_tokens:
            raise RuntimeError(
                f"generate returned {out.shape[1] - self.ids.shape[1]} new tokens, not {self.num_tokens}"
            )
        mask = torch.cat(
            [self.mask.repeat_interleave(self.spec["group"], dim=0), torch.ones_like(out[:, -self.num_tokens :])], dim=1
        )
        return out, mask

    def advantages(self, rows):
        """Upstream's `ranking` rewards by beam rank, then (r - mean) / (std + 1e-4) per group (sid's numpy)."""
        import torch

        from sid.rl.advantages import group_advantages
        from sid.rl.rewards import get_reward

        width = self.ids.shape[1]
        paths = rows[:, width : width + self.depth].tolist()
        sids = np.array([self.sid_of_path.get(tuple(p), "") for p in paths]).reshape(len(self.targets), -1)
        ranks = np.broadcast_to(np.arange(sids.shape[1]), sids.shape)
        rewards = get_reward("ranking")(sids, ranks, np.asarray(self.targets))
        self.invalid, self.reward_mean = int((sids == "").sum()), float(rewards.mean())
        return torch.tensor(group_advantages(rewards).reshape(-1), dtype=torch.float32, device=self.device)

    def micro_batches(self, *tensors):
        return zip(*(t.chunk(self.spec["accum"]) for t in tensors), strict=True)

    def reference_logprobs(self, rows, mask):
        import torch

        with torch.no_grad():
            return torch.cat(
                [
                    torch_completion_logprobs(self.ref, r, m, self.num_tokens, self.valid_vocab)
                    for r, m in self.micro_batches(rows, mask)
                ]
            )

    def update(self, rows, mask, ref_logp, advantages) -> float:
        """One AdamW step on the mean over all completions of upstream's loss, accumulated over micro-batches."""
        import torch

        self.policy.train()
        total = torch.zeros((), device=self.device)  # summed on the device: no sync per micro-batch
        for r, m, ref, adv in self.micro_batches(rows, mask, ref_logp, advantages):
            logp = torch_completion_logprobs(self.policy, r, m, self.num_tokens, self.valid_vocab)
            ones = torch.ones_like(logp)  # every trie completion has exactly T tokens (rollout() checks)
            loss = torch_grpo_loss(logp, ref, adv, ones, BETA).sum() / rows.shape[0]
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(self.policy.parameters(), CLIP_NORM)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(total)

    def step(self) -> dict[str, Any]:
        t0 = self.sync()
        rows, mask = self.rollout()
        t1 = self.sync()
        advantages = self.advantages(rows)
        t2 = self.sync()
        ref_logp = self.reference_logprobs(rows, mask)
        t3 = self.sync()
        loss = self.update(rows, mask, ref_logp, advantages)
        t4 = self.sync()
        return {
            "rollout_s": t1 - t0,
            "host_s": t2 - t1,
            "ref_logprobs_s": t3 - t2,
            "update_s": t4 - t3,
            "step_s": t4 - t0,
            "rows": int(rows.shape[0]),
            "completion_tokens": self.num_tokens,
            "loss": loss,
            "reward_mean": self.reward_mean,
            "kl": None,
        }

    def cross_check(self) -> dict[str, Any]:
        """Our reference log-probs of sid's first rollout rows against sid's (the same initial weights)."""
        import torch

        batch = np.load(Path(self.spec["weights_dir"]) / FIRST_BATCH)
        ids, mask, theirs = separate_rows(batch)
        ids, mask = (torch.tensor(a, dtype=torch.long, device=self.device) for a in (ids, mask))
        ours = self.reference_logprobs(ids, mask).cpu().numpy().reshape(theirs.shape)
        diff = np.abs(ours - theirs)
        return {
            "ref_logp_max_abs_diff": float(diff.max()),
            "ref_logp_mean_sid": float(theirs.mean()),
            "ref_logp_mean_torch": float(ours.mean()),
        }


def measure_torch(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    import transformers

    rl = TorchStep(spec)
    if rl.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    check = rl.cross_check() if spec["weights_dir"] else {}
    out = run_steps(rl.step, spec)
    return {
        **spec,
        "dtype": str(rl.dtype).removeprefix("torch."),
        "backend": rl.device,
        "device_kind": torch.cuda.get_device_name() if rl.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        **out,
        "prompt_width": int(rl.ids.shape[1]),
        "invalid_completions": rl.invalid,
        "cross_check": check or None,
        "peak_bytes_in_use": torch.cuda.max_memory_allocated() if rl.device == "cuda" else None,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench/rl_throughput.json", help="JSON results path")
    p.add_argument("--arch", default="1.5b", help="0.5b, 1.5b, small or tiny")
    p.add_argument("--prompts", type=int, default=64, help="prompts per step, P (a multiple of the devices)")
    p.add_argument("--group", type=int, default=16, help="beams per prompt, G")
    p.add_argument("--accum", type=int, default=8, help="micro-batches per update (sid: P prompts split evenly)")
    p.add_argument(
        "--remat", default="dots", choices=["none", "full", "dots"], help="torch: checkpointing iff not none"
    )
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"], help="auto: bf16 on a GPU")
    p.add_argument("--attention", default="auto", choices=["auto", "xla", "cudnn"])
    p.add_argument("--steps", type=int, default=3, help="timed steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after the first (compiling) one")
    p.add_argument("--baseline", default="auto", choices=["auto", "on", "off"], help="auto: only when torch.cuda is")
    p.add_argument("--same-weights", action="store_true", help="the baseline loads sid's initial weights; cross-check")
    p.add_argument("--data-root", default="", help="data root (default $SID_DATA_ROOT, else ../shared/data)")
    p.add_argument("--data-dir", default="minionerec_industrial", help="MiniOneRec dataset under the data root")
    p.add_argument("--tokenizer", default="qwen2_tokenizer", help="tokenizer directory under the data root")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="CPU smoke: tiny model, 4 prompts x 4 beams, 2 timed steps")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tiny:
        args.arch, args.prompts, args.group, args.accum, args.steps, args.warmup = "tiny", 4, 4, 2, 2, 0
        args.remat, args.dtype, args.same_weights = "none", "float32", True
        args.baseline = "on" if args.baseline == "auto" else args.baseline
    if args.prompts * args.group % args.accum:
        p.error(f"--prompts x --group = {args.prompts * args.group} rows do not split into --accum {args.accum}")
    return args


def report(args, ours: dict[str, Any], base: dict[str, Any] | None) -> dict[str, Any]:
    """The results record, with the ratio of step times (baseline / sid), and its printed tables."""
    ok = base is not None and "error" not in base and "error" not in ours
    ratio = base["step_s"] / ours["step_s"] if ok else None
    spec = {k: v for k, v in vars(args).items() if k not in ("out", "child")}
    record = {
        "benchmark": "rl_throughput",
        "args": spec,
        **host_environment(),
        "sid": ours,
        "baseline": base,
        "baseline_over_sid_step_s": ratio,
    }
    rows = [dict(ours, system="sid (jax)"), *([dict(base, system="HF generate + torch")] if base else [])]
    columns = {
        "system": "system",
        "arch": "arch",
        "dtype": "dtype",
        "rows": "rows",
        "step_s": "step s",
        "rollout_s": "rollout s",
        "host_s": "host s",
        "ref_logprobs_s": "ref log-probs s",
        "update_s": "update s",
        "first_step_s": "first step s",
        "error": "error",
    }
    print(markdown_table(rows, columns))
    check = (base or {}).get("cross_check")
    print(f"\nbaseline / sid step time: {ratio if ratio is None else f'{ratio:.1f}x'}")
    if check:
        print(f"reference log-probs of sid's rows, |torch - sid| max: {check['ref_logp_max_abs_diff']:.3g}")
    return record


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if serve_child(args, {"sid": measure_sid, "torch": measure_torch}):
        return 0
    if args.baseline == "auto":
        args.baseline = "on" if cuda_available() else "off"
    spec = {k: v for k, v in vars(args).items() if k not in ("out", "child", "tiny", "baseline", "same_weights")}
    with tempfile.TemporaryDirectory() as tmp:
        spec["weights_dir"] = tmp if args.same_weights and args.baseline == "on" else ""
        ours = run_child(__file__, dict(spec, framework="sid"))
        base = run_child(__file__, dict(spec, framework="torch")) if args.baseline == "on" else None
    write_json(args.out, report(args, ours, base))
    print(f"wrote {Path(args.out).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
