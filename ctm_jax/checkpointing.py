"""Orbax checkpoints of the whole training state plus the input position.

Saves are asynchronous, atomic (written to a temporary directory, renamed when complete),
never overwrite an existing step, and old ones are deleted only after a newer save has
finished: keep the newest `keep_last`, plus every step that is a multiple of `keep_every`.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import jax
import orbax.checkpoint as ocp

from ctm_jax import fileio


def checkpoint_dir(workdir: str) -> str:
  """workdir/checkpoints: a local path made absolute, a URL (gs://...) as it is (Orbax writes
  there itself, every process its own array shards)."""
  return fileio.join(fileio.absolute(workdir), "checkpoints")


class Checkpointer:
  ITEMS = ("state", "data", "meta")

  def __init__(self, workdir: str, training_cfg, *, read_only: bool = False):
    opts = ocp.CheckpointManagerOptions(
        max_to_keep=int(training_cfg.keep_last),
        keep_period=int(training_cfg.keep_every) or None,
        enable_async_checkpointing=bool(training_cfg.async_checkpointing),
        create=not read_only,
        read_only=read_only,
        cleanup_tmp_directories=not read_only,
    )
    self.directory = checkpoint_dir(workdir)
    self.manager = ocp.CheckpointManager(self.directory, item_names=self.ITEMS, options=opts)

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self):
    return list(self.manager.all_steps())

  def save(self, step: int, state, data_state: dict, meta: dict) -> bool:
    if step in self.manager.all_steps():
      return False   # never overwrite a finished checkpoint
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, step: int, abstract_state) -> Tuple[Any, dict, dict]:
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore()))
    return out["state"], out["data"], out["meta"]

  def restore_subtree(self, step: int, subtree) -> Any:
    """Only the arrays of `subtree` (nested dicts of ShapeDtypeStructs, keyed like the saved
    state: {'ema': {name: params}}, {'params': params}, ...) from the saved state; nothing
    else is read.  Leaves with a sharding come back as jax.Arrays, the others as numpy."""
    restore_args = ocp.checkpoint_utils.construct_restore_args(subtree)
    out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=subtree, restore_args=restore_args, partial_restore=True)))
    return out["state"]

  def restore_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs carrying the target shardings, for a sharded restore."""
  return jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)
