"""Checkpoints: the train state and the data loader's state, and older checkpoints."""

import numpy as np
import orbax.checkpoint as ocp

from attn_jax.train.checkpoints import Checkpoints


def _state(value):
    weights = np.full((2, 3), value, np.float32)
    return {"params": {"w": weights}, "step": np.asarray(value, np.int32)}


def test_the_loader_state_is_saved_and_restored_with_the_train_state(tmp_path):
    checkpoints = Checkpoints(tmp_path, keep=2)
    checkpoints.save(3, _state(3), {"accuracy": 0.5}, loader={"next_index": 3})
    checkpoints.save(5, _state(5), None, loader={"next_index": 5})
    state, loader = checkpoints.restore_latest(_state(0))
    checkpoints.close()
    np.testing.assert_array_equal(state["params"]["w"], _state(5)["params"]["w"])
    assert loader == {"next_index": 5}


def test_a_checkpoint_from_before_loader_states_still_resumes(tmp_path):
    legacy = ocp.CheckpointManager(tmp_path)  # one unnamed item, as earlier versions wrote
    legacy.save(4, args=ocp.args.StandardSave(_state(4)))
    legacy.wait_until_finished()
    legacy.close()
    checkpoints = Checkpoints(tmp_path, keep=2)
    state, loader = checkpoints.restore_latest(_state(0))
    assert int(state["step"]) == 4 and loader is None
    checkpoints.save(6, _state(6), None, loader={"next_index": 6})  # then the new layout
    state, loader = checkpoints.restore_latest(_state(0))
    checkpoints.close()
    assert int(state["step"]) == 6 and loader == {"next_index": 6}
    assert (tmp_path / "4").is_dir()  # nothing written before is lost
