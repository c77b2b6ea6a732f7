"""W&B tracking that never stops a run: lazy import, and any failure degrades to disabled with one warning (and,
given the run directory, a `wandb` section in run_summary.json saying why)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from sid.config import WandbConfig

if TYPE_CHECKING:
    from sid.run import RunDir

log = logging.getLogger("sid")


class Tracker:
    """Logs metrics to W&B when enabled; a missing package, failed init or failed log turns it off with one
    warning and the run goes on.

    Given `run`, the run name, config and main-process flag default to the run directory's, W&B's files (offline:
    the run to sync later) go under it rather than the current directory, and run_summary.json's `wandb` section
    says whether W&B logs, and why not when it was asked to."""

    def __init__(
        self,
        cfg: WandbConfig,
        *,
        run: RunDir | None = None,
        run_name: str | None = None,
        config: dict[str, Any] | None = None,
        enabled: bool | None = None,
    ):
        self.run = None
        self.mode = cfg.mode
        self._run_dir = run
        enabled = (run.main if run is not None else True) if enabled is None else enabled
        if cfg.mode == "disabled" or not enabled:
            return
        try:
            import wandb

            self.run = wandb.init(
                project=cfg.project,
                entity=cfg.entity,
                name=cfg.name or run_name or (run.path.name if run is not None else None),
                tags=list(cfg.tags),
                mode=cfg.mode,
                config=config if config is not None else (run.summary.get("config") if run is not None else None),
                dir=str(run.path) if run is not None else None,
                settings=wandb.Settings(init_timeout=cfg.init_timeout_s, login_timeout=cfg.init_timeout_s),
            )
        except Exception as e:  # noqa: BLE001 - tracking must never stop a run
            self._disable(f"W&B init failed ({type(e).__name__}: {e}); continuing with W&B disabled")
        else:
            self._record(logging=True)

    def _record(self, logging: bool, why: str | None = None) -> None:
        if self._run_dir is not None:
            self._run_dir.update(wandb={"mode": self.mode, "logging": logging, **({"why_not": why} if why else {})})

    def _disable(self, why: str) -> None:
        log.warning(why)
        self.run = None
        self._record(logging=False, why=why)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.run is None:
            return
        try:
            self.run.log(metrics, step=step)
        except Exception as e:  # noqa: BLE001
            self._disable(f"W&B log failed ({type(e).__name__}: {e}); continuing with W&B disabled")

    def summary(self, values: dict[str, Any]) -> None:
        if self.run is None:
            return
        try:
            self.run.summary.update(values)
        except Exception as e:  # noqa: BLE001
            self._disable(f"W&B summary failed ({type(e).__name__}: {e}); continuing with W&B disabled")

    def finish(self) -> None:
        if self.run is not None:
            try:
                self.run.finish()
            except Exception as e:  # noqa: BLE001
                log.warning("W&B finish failed (%s: %s)", type(e).__name__, e)
            self.run = None
