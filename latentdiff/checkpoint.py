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

    def restore(self, abstract_state, legacy=None):
        """Newest readable checkpoint as (state, data state, step), or None when there is none at all.

        `legacy`: (abstract state of an older layout, function from it to the current state), tried
        on each checkpoint that the current layout cannot read."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            return None
        layouts = [(abstract_state, None)] + ([legacy] if legacy is not None else [])
        errors = []
        for step in steps:
            failures = []
            for target, convert in layouts:
                try:
                    out = self.manager.restore(step, args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(),
                        meta=ocp.args.JsonRestore()))
                except Exception as e:  # noqa: BLE001 - try the next layout / step, report all at the end
                    failures.append(e)
                    continue
                if convert is None:
                    return out["state"], out["data"], step
                print(f"checkpoint at step {step} in {self.directory} has an older layout: converted")
                return convert(out["state"]), out["data"], step
            why = [f"{type(e).__name__}: {e}" for e in failures]
            errors.append(f"step {step}: " + "\n  as an older layout: ".join(why))
            warnings.warn(f"checkpoint at step {step} in {self.directory} could not be restored "
                          f"({type(failures[0]).__name__}); trying the previous one")
        raise RuntimeError(f"no checkpoint in {self.directory} could be restored:\n" + "\n".join(errors))

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()
