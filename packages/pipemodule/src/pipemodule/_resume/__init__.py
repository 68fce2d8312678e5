"""Full training-state checkpoints: torch.distributed.checkpoint, committed atomically, resharded.

``save.py`` writes, ``load.py`` checks then reads, ``state.py`` is what a checkpoint holds,
``tree.py`` stores non-tensor values as JSON, ``storage.py`` is DCP storage that runs no pickled
code, ``commit.py`` is the staging directory, commit marker, ``latest`` and keep-last-K, and
``validate.py`` the checks made before anything is changed.
"""

from pipemodule._resume.commit import latest_checkpoint
from pipemodule._resume.load import load_checkpoint
from pipemodule._resume.save import save_checkpoint
from pipemodule._stage.checkpoint import CheckpointError

__all__ = ["CheckpointError", "latest_checkpoint", "load_checkpoint", "save_checkpoint"]
