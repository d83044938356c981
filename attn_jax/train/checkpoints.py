"""Orbax checkpoints in the workdir: the last few, plus the best by the eval metric."""

from __future__ import annotations

import pathlib
import shutil
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers as policies

__all__ = ["Checkpoints"]


class Checkpoints:
    """An orbax ``CheckpointManager`` keeping the ``keep`` latest steps and the best one.

    Args:
      directory: where step directories are written (created if missing).
      keep: how many of the latest checkpoints to keep.
      best_metric: eval metric whose highest value marks the best checkpoint.
    """

    def __init__(self, directory: str | pathlib.Path, keep: int, best_metric: str = "accuracy"):
        self.best_metric = best_metric
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policies.AnyPreservationPolicy(
                policies=[
                    policies.LatestN(n=keep),
                    policies.BestN(
                        get_metric_fn=lambda m: m[best_metric],
                        n=1,
                        keep_checkpoints_without_metrics=False,
                    ),
                ]
            ),
            enable_async_checkpointing=False,
        )
        self.directory = pathlib.Path(directory).absolute()
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def save(
        self,
        step: int,
        state: Any,
        metrics: dict[str, float] | None = None,
        loader: dict[str, Any] | None = None,
    ) -> None:
        """Saves ``state`` (a pytree, on host) at ``step`` as the item ``state``, and the
        data loader's state (JSON) as the item ``loader``; ``metrics`` rank it for
        "best"."""
        items = {"state": ocp.args.StandardSave(jax.device_get(state))}
        if loader is not None:
            items["loader"] = ocp.args.JsonSave(loader)
        self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)
        self.manager.wait_until_finished()

    def _restore(self, step: int, template: Any) -> tuple[Any, dict[str, Any] | None]:
        """``(state, loader state or None)`` of ``step``; a checkpoint written before the
        loader's state was saved (one unnamed item) restores with no loader state."""
        path = self.directory / str(step)
        if (path / "default").is_dir():
            legacy = ocp.CheckpointManager(self.directory)
            try:
                return legacy.restore(step, args=ocp.args.StandardRestore(template)), None
            finally:
                legacy.close()
        items = {"state": ocp.args.StandardRestore(template)}
        if (path / "loader").is_dir():
            items["loader"] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"], restored.get("loader")

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def best_step(self) -> int | None:
        return self.manager.best_step()

    def restore_latest(self, template: Any) -> tuple[Any, dict[str, Any] | None] | None:
        """``(state, loader state)`` of the newest readable checkpoint, the state shaped
        like ``template`` (the loader state ``None`` if it has none), or ``None`` if none.

        An unreadable checkpoint (e.g. truncated by a crash) is skipped with a warning and
        moved, intact, to ``<directory>/../unreadable_checkpoints/<step>`` so training can
        write that step again; nothing is deleted.
        """
        unreadable = []
        restored = None
        for step in reversed(self.steps()):
            try:
                restored = self._restore(step, template)
                break
            except Exception as error:
                first_line = (str(error).splitlines() or [""])[0][:200]
                message = (
                    f"checkpoint at step {step} is unreadable ({type(error).__name__}: "
                    f"{first_line}); falling back to the previous one"
                )
                logging.warning(message)
                print(f"warning: {message}", flush=True)
                unreadable.append(step)
        if unreadable:
            quarantine = self.directory.parent / "unreadable_checkpoints"
            quarantine.mkdir(exist_ok=True)
            for step in unreadable:
                source = self.directory / str(step)
                target = quarantine / f"{step}_{int(time.time())}"
                shutil.move(str(source), str(target))
                print(f"moved unreadable checkpoint {source} to {target}", flush=True)
            self.manager.reload()
        return restored

    def close(self) -> None:
        self.manager.close()
