"""W&B tracking that never stops a run: lazy import, and any failure degrades to disabled with one warning."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

log = logging.getLogger("sid")


@dataclass(frozen=True)
class WandbConfig:
    """Weights & Biases logging. The API key comes from the environment or a .env file, never a config."""

    mode: Literal["online", "offline", "disabled"] = "disabled"
    """online, offline (sync later), or disabled."""
    project: str = "sid"
    """W&B project."""
    entity: str | None = None
    """W&B entity (team); None: the key's default."""
    name: str | None = None
    """Run name; None: the run directory's name."""
    tags: tuple[str, ...] = ()
    """Run tags."""


class Tracker:
    """Logs metrics to W&B when enabled; a missing package, failed init or failed log turns it off with one
    warning and the run goes on."""

    def __init__(self, cfg: WandbConfig, *, run_name: str, config: dict[str, Any], enabled: bool = True):
        self.run = None
        if cfg.mode == "disabled" or not enabled:
            return
        try:
            import wandb

            self.run = wandb.init(
                project=cfg.project,
                entity=cfg.entity,
                name=cfg.name or run_name,
                tags=list(cfg.tags),
                mode=cfg.mode,
                config=config,
            )
        except Exception as e:  # noqa: BLE001 - tracking must never stop a run
            self._disable(f"W&B init failed ({type(e).__name__}: {e}); continuing with W&B disabled")

    def _disable(self, why: str) -> None:
        log.warning(why)
        self.run = None

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
