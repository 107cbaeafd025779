"""Converters of other projects' weight files, one module per method (clip, albef, blip, coca,
blip2): the architecture a published checkpoint implies, its key map onto our modules, and the
--init-from dispatch between those files and our own checkpoints. The training scripts make one
call into them; the method itself stays in the script."""
