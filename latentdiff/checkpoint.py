"""Orbax checkpoints of a run: train state + data position + run metadata, saved asynchronously.

A failed restore is an error, never a silent fresh start; when the newest checkpoint is unreadable
the previous one is used, with a warning.
"""
import os
import warnings

import orbax.checkpoint as ocp


class Checkpointer:
    """`save(step, state, data_state)`, `restore(abstract_state) -> (state, data_state, step)`."""

    def __init__(self, directory, max_to_keep=3, async_save=True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data", "meta"))

    def latest_step(self):
        return self.manager.latest_step()

    def save(self, step, state, data_state, meta=None, force=False):
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=ocp.args.JsonSave(data_state),
                                  meta=ocp.args.JsonSave(meta or {}))
        return self.manager.save(int(step), args=args, force=force)

    def restore(self, abstract_state):
        """Newest readable checkpoint, or None when there is none at all."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            return None
        errors = []
        for step in steps:
            try:
                out = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
                    meta=ocp.args.JsonRestore()))
            except Exception as e:  # noqa: BLE001 - try the previous one, report all at the end
                errors.append(f"step {step}: {type(e).__name__}: {e}")
                warnings.warn(f"checkpoint at step {step} in {self.directory} could not be restored "
                              f"({type(e).__name__}); trying the previous one")
                continue
            return out["state"], out["data"], step
        raise RuntimeError(f"no checkpoint in {self.directory} could be restored:\n" + "\n".join(errors))

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()
