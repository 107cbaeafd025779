"""Converters of other projects' weight files, one module per method (clip, albef, blip, coca,
blip2): the architecture a published checkpoint implies, its key map onto our modules, and the
--init-from dispatch between those files and our own checkpoints. The training scripts make one
call into them; the method itself stays in the script."""
import os

from ..utils import load_checkpoint


def read_hf_or_ours(path):
    """What an --init-from names, for a method whose published weights are transformers folders:
    ("hf", None) for such a folder, ("ours", checkpoint) for one of our checkpoints, (None, None)
    without one."""
    if not path:
        return None, None
    return ("hf", None) if os.path.isdir(path) else ("ours", load_checkpoint(path))
