"""`python tests/workers/compiled_run.py SCRIPT ARGS...`: run a training script with torch.compile's
`aot_eager` backend (Dynamo's graph capture and AOT autograd, without Inductor's code generation,
which takes minutes on a CPU). Each rank writes the node counts of the graphs it compiled to
OUTPUT_DIR/compiled_graphs_rank<R>.json, so a test can tell that compilation happened."""
import atexit
import functools
import json
import os
import runpy
import sys

import torch
from torch._dynamo.backends.debugging import aot_eager

graphs = []


def counting_aot_eager(gm, example_inputs):
    graphs.append(len(gm.graph.nodes))
    return aot_eager(gm, example_inputs)


def report():
    out = sys.argv[sys.argv.index("--output-dir") + 1]
    with open(os.path.join(out, f"compiled_graphs_rank{os.environ.get('RANK', '0')}.json"), "w") as f:
        json.dump(graphs, f)


torch.compile = functools.partial(torch.compile, backend=counting_aot_eager)
atexit.register(report)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
