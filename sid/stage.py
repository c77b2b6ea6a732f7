"""What every training entry point (`sid.train`, `sid.rl`, `sid.nanogpt`) does around `fit`: at the start, the run
directory, W&B and the mesh (`start_run`); once `fit` returns, the HF export of the model it hands on and the test
eval, or the preempted status (`hand_on`); and the process exit code that tells a scheduler which it was."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import Mesh

from sid.compat.hf import export_qwen2
from sid.compile_cache import enable_compilation_cache
from sid.config import run_cli
from sid.data.tokenizer import SIDTokenizer
from sid.eval.runner import evaluate
from sid.models.qwen2 import Qwen2
from sid.parallel.distributed import init_distributed
from sid.parallel.host import to_host
from sid.parallel.mesh import make_mesh
from sid.run import RunDir, load_dotenv
from sid.selection import check_selection
from sid.tracking import Tracker
from sid.trainer import check_output_dir

log = logging.getLogger("sid")

PREEMPTED_EXIT_CODE = 75
"""Exit status of a run stopped by SIGTERM after saving its checkpoint (EX_TEMPFAIL: run it again with
--train.resume); run_summary.json then says status: preempted. 0: finished; 1: stopped (non-finite loss, a
checkpoint that cannot be written); 2: bad input."""


def start_run(job) -> tuple[RunDir, Tracker, Mesh]:
    """Join a multi-process run, read `.env`, turn on the persistent compilation cache (`sid.compile_cache`),
    refuse what would clobber or never feed (an earlier run's checkpoints without `--train.resume`, a selection no
    evaluation feeds), then open the run directory, W&B (first, so that a W&B that was asked for and cannot log
    says so at once) and the mesh."""
    init_distributed(job.mesh)
    load_dotenv()
    cache = enable_compilation_cache()
    check_output_dir(job.train)
    check_selection(job.train, getattr(job, "eval", None))
    run = RunDir(job.train.output_dir, job)
    tracker = Tracker(job.wandb, run=run)
    mesh = make_mesh(job.mesh)
    log.info("mesh %s over %d devices (%s)", dict(mesh.shape), mesh.devices.size, jax.devices()[0].platform)
    log.info("compilation cache: %s", cache or "off (JAX_ENABLE_COMPILATION_CACHE=false)")
    return run, tracker, mesh


def export_and_evaluate(job, model: Qwen2, tok: SIDTokenizer, mesh, run: RunDir, tracker) -> None:
    """The HF export of the model the run hands on (RUN_DIR/model), then the test eval (eval.enabled)."""
    host_model = to_host(model)  # a collective on multi-host runs: every process takes part
    if run.main:
        export_qwen2(host_model, run.path / "model", tok.tokenizer, eos_token=tok.tokenizer.id_to_token(tok.eos_id))
    if job.eval.enabled:
        run.update(eval=evaluate(model, tok, job.data, job.tasks, job.eval, mesh=mesh, run=run, tracker=tracker))


def hand_on(job, model: Qwen2, train: dict[str, Any], tok: SIDTokenizer, mesh, run: RunDir, tracker) -> None:
    """After `fit`: export and evaluate a finished run; mark a preempted one (no export: it is not done)."""
    if train.get("preempted_at") is None:
        export_and_evaluate(job, model, tok, mesh, run, tracker)
    else:
        run.update(status="preempted", exit_code=PREEMPTED_EXIT_CODE)
    tracker.finish()


def stage_main(job_cls: type, run_job: Callable[[Any], dict], argv: list[str] | None) -> int:
    """An entry point's exit code: `run_cli`'s, or PREEMPTED_EXIT_CODE for a run that saved and stopped on SIGTERM."""
    summary: dict = {}
    rc = run_cli(job_cls, lambda job: summary.update(run_job(job)), argv)
    return PREEMPTED_EXIT_CODE if rc == 0 and summary.get("status") == "preempted" else rc
