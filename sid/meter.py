"""What a run reports while it trains: throughput, MFU, each compiled step's memory, the per-step log line,
metrics.jsonl, W&B and the progress bar. The loop hands it each step's device metrics; it reads them one step late
so that dispatch stays asynchronous, and refuses non-finite values before anything downstream trusts them."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax

from sid.errors import NonFiniteLoss
from sid.models.flops import TrainFlops
from sid.parallel.report import format_bytes
from sid.run import RunDir
from sid.tracking import Tracker

log = logging.getLogger("sid")


_PEAK_FLOPS = {  # dense bf16 per device
    "h100": 989e12,
    "h200": 989e12,
    "a100": 312e12,
    "tpu v6": 918e12,
    "tpu v5 lite": 197e12,
    "tpu v5e": 197e12,
    "tpu v5": 459e12,
    "tpu v4": 275e12,
}


def peak_flops_per_device() -> float | None:
    """Peak bf16 FLOP/s of the local device kind, or None where unknown (e.g. CPU): MFU is then not reported."""
    kind = jax.devices()[0].device_kind.lower()
    return next((v for k, v in _PEAK_FLOPS.items() if k in kind), None)


def device_memory_limit() -> int | None:
    """Bytes a local device can allocate (None where the backend has no allocator stats, e.g. CPU)."""
    return (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")


def log_step_memory(need: int | None, signature: tuple, seconds: float) -> None:
    """One line per compiled step shape: how long it took and what it needs per device (`step_memory_bytes`),
    against what the device has where the backend says (a mode such as `train.gather_params_once` shows its cost
    here before a long run)."""
    shapes = ", ".join(f"{k} {tuple(shape)}" for k, shape in signature if k == "input_ids") or str(signature)
    limit = device_memory_limit()
    memory = "" if need is None else f": {format_bytes(need)} per device"
    if need is not None and limit:
        memory += f" of {format_bytes(limit)} ({100 * need / limit:.0f}%)"
    log.info("train step for %s compiled in %.1f s%s", shapes, seconds, memory)


def task_losses(m: dict[str, Any]) -> dict[str, float]:
    """`loss/<task>` means from a step's additive `loss_sum/<task>` and `tokens/<task>` stats (tasks with tokens)."""
    out = {}
    for key, total in m.items():
        if key.startswith("loss_sum/"):
            task = key.removeprefix("loss_sum/")
            if int(m[f"tokens/{task}"]) > 0:
                out[f"loss/{task}"] = float(total) / int(m[f"tokens/{task}"])
    return out


class Meter:
    """Times the steps (the first one, which compiles, is not timed), logs every `log_every` steps and at the end.
    Each record also holds `step_stats(step metrics)`: the per-task losses by default (SFT), the GRPO figures in RL;
    the progress bar shows those named in `bar_stats` beside the loss (RL's loss is about 0 whatever it learns).

    A step's time runs from one step's hand-over (`push`) to the next's, held-out evaluations and saves excluded:
    in SFT that is one step on the device; in RL, whose batch source rolls out with the params of the step before,
    it is the update and the next rollout. So a step is read (its metrics checked) as soon as the loop
    needs it, but recorded (timed, logged) only at the next hand-over or at `finish`."""

    def __init__(
        self,
        *,
        run: RunDir,
        tracker: Tracker,
        total_steps: int,
        start: int,
        log_every: int,
        flops: TrainFlops | None,
        n_devices: int,
        progress_bar: bool,
        last_good: Callable[[], str],
        step_stats: Callable[[dict[str, Any]], dict[str, float]] = task_losses,
        bar_stats: Sequence[str] = (),
    ):
        self.run, self.tracker, self.total, self.start, self.log_every = run, tracker, total_steps, start, log_every
        self.flops, self.n_devices, self.peak, self.last_good = flops, n_devices, peak_flops_per_device(), last_good
        self.step_stats, self.bar_stats = step_stats, bar_stats
        self.pending: tuple[int, Any] | None = None  # handed over, not read
        self.read: tuple[int, dict[str, Any]] | None = None  # read, not recorded
        self.tokens = self.targets = self.timed_steps = 0
        self.timed_s, self.last_loss = 0.0, float("nan")
        self.bar = None
        if progress_bar and run.main:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start, dynamic_ncols=True, desc="train")
        self.t_last = self.t_read = time.perf_counter()
        self.excluded_s = 0.0

    def push(self, step: int, metrics: Any) -> None:
        """Hand over step `step`'s device metrics; the steps before it are read and recorded now."""
        self.finish()
        self.pending = (step, metrics)

    def _read(self) -> None:
        """Read the pending step's metrics (wait for them) and check them, before anything uses its params."""
        if self.pending is None:
            return
        step, metrics = self.pending
        self.pending = None
        m = jax.device_get(metrics)
        self._check_finite(step, m)
        self.last_loss = float(m["loss"])
        self.read, self.t_read = (step, m), time.perf_counter()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Read the pending step now (its params are about to be evaluated or saved); what runs inside (and since
        the read) is left out of the step times."""
        self._read()
        yield
        now = time.perf_counter()
        self.excluded_s, self.t_read = self.excluded_s + now - self.t_read, now

    def finish(self) -> None:
        """Read the pending step, and time, count and log the read one."""
        self._read()
        self._record(timed=True)

    def _record(self, *, timed: bool) -> None:
        if self.read is None:
            return
        (step, m), self.read = self.read, None
        now = time.perf_counter()
        dt, self.t_last, self.excluded_s = now - self.t_last - self.excluded_s, now, 0.0
        if timed and step > self.start + 1:  # the first step includes compilation
            self.tokens += int(m["tokens"])
            self.targets += int(m["supervised_tokens"])
            self.timed_s += dt
            self.timed_steps += 1
        record = {"step": step, "loss": float(m["loss"]), "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"])}
        extra = self.step_stats(m)
        record.update(tokens_per_s=self.tokens_per_s, step_time_s=dt if timed else None, mfu=self.mfu, **extra)
        self._show(record, extra)

    def _check_finite(self, step: int, m: dict[str, Any]) -> None:
        # A finite loss can still come with NaN gradients or an overflowing update, which poison the params the step
        # returned: check all three before anything (the next save) uses them.
        bad = [k for k in ("loss", "grad_norm", "update_norm") if k in m and not math.isfinite(float(m[k]))]
        if bad:
            raise NonFiniteLoss(
                f"non-finite {', '.join(f'{k} {float(m[k])}' for k in bad)} at step {step}; stopped. "
                f"Last good checkpoint: {self.last_good()}"
            )

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.timed_s if self.timed_s > 0 else 0.0

    @property
    def mfu(self) -> float | None:
        if not (self.peak and self.flops and self.timed_s):
            return None
        return self.flops(self.tokens, self.targets) / self.timed_s / (self.peak * self.n_devices)

    def _show(self, record: dict[str, Any], extra: dict[str, float]) -> None:
        step, mfu = record["step"], record["mfu"]
        if self.bar is not None:
            post = {"loss": f"{record['loss']:.4f}", "lr": f"{record['lr']:.2e}", "tok/s": f"{self.tokens_per_s:,.0f}"}
            if mfu is not None:
                post["mfu"] = f"{100 * mfu:.1f}%"
            post.update({k.rsplit("/", 1)[-1]: f"{extra[k]:.4g}" for k in self.bar_stats if k in extra})
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(1)
        if step % self.log_every and step != self.total:
            return
        self.run.append_metrics(record)
        extra_logged = {f"train/{k}": v for k, v in extra.items()}
        logged = {"train/loss": record["loss"], "train/lr": record["lr"], "train/grad_norm": record["grad_norm"]}
        perf = {"perf/tokens_per_s": self.tokens_per_s, **({"perf/mfu": mfu} if mfu is not None else {})}
        self.tracker.log({**logged, **extra_logged, **perf}, step)
        if self.bar is None:
            extra_text = "".join(f" {k} {v:.4f}" for k, v in extra.items())
            log.info(
                "step %d/%d loss %.4f lr %.2e grad_norm %.3f tok/s %.0f%s",
                *(step, self.total, record["loss"], record["lr"], record["grad_norm"], self.tokens_per_s, extra_text),
            )

    def summary(self) -> dict[str, Any]:
        return {
            "final_loss": self.last_loss,
            "tokens_per_s": self.tokens_per_s if self.timed_s > 0 else None,
            "step_time_s": self.timed_s / self.timed_steps if self.timed_steps else None,
        }

    def close(self) -> None:
        """A step read before an error (a failed save) is still logged, untimed: the error's time is not the step's."""
        self._record(timed=False)
        if self.bar is not None:
            self.bar.close()
