"""Every benchmark in one run: the five methods' training steps against their peers (open_clip for
CLIP and CoCa, LAVIS 1.0.2 for ALBEF, BLIP and BLIP-2 stage 1, transformers for BLIP-2 stage 2)
and data loading from shards against JSON, one after another, then one Markdown table. Not
collected by pytest; needs LAVIS's environment (`bash tests/lavis/setup.sh`) and a quiet machine.

    python tests/bench/bench_all.py                 # tiny and compute rows (~25 min on 2 CPU cores)
    python tests/bench/bench_all.py --only tiny     # the tiny rows and data loading (~6 min)

Each row runs the benchmark's own command (printed in the table), which alternates ours and the
peer in fresh processes and prints a JSON summary; ratios are of medians over its rounds:
throughput ours / peer (> 1: ours faster), memory ours / peer (< 1: ours smaller; training memory
for the LAVIS and transformers rows, peak memory for open_clip's)."""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--rounds", "3", "--steps", "10"]
COMPUTE = ["--config", "compute", "--rounds", "3", "--steps", "3", "--warmup", "1"]
ROWS = [   # (method, peer, size, command)
    ("CLIP", "open_clip", "tiny", ["tests/bench/bench_clip.py", "--rounds", "3", "--steps", "15"]),
    ("CLIP", "open_clip", "compute", ["tests/bench/bench_clip.py", "--config", "compute", "--rounds", "3", "--steps", "4",
                                      "--warmup", "1"]),
    ("ALBEF", "LAVIS", "tiny", ["tests/bench/bench_lavis.py", "albef", *TINY]),
    ("ALBEF", "LAVIS", "compute", ["tests/bench/bench_lavis.py", "albef", *COMPUTE]),
    ("BLIP", "LAVIS", "tiny", ["tests/bench/bench_lavis.py", "blip", *TINY]),
    ("BLIP", "LAVIS", "compute", ["tests/bench/bench_lavis.py", "blip", *COMPUTE]),
    ("BLIP-2 stage 1", "LAVIS", "tiny", ["tests/bench/bench_lavis.py", "blip2", *TINY]),
    ("BLIP-2 stage 1", "LAVIS", "compute", ["tests/bench/bench_lavis.py", "blip2", *COMPUTE]),
    ("BLIP-2 stage 2", "transformers", "tiny", ["tests/bench/bench_blip2_stage2.py", *TINY, "--warmup", "2"]),
    ("BLIP-2 stage 2", "transformers", "compute", ["tests/bench/bench_blip2_stage2.py", *COMPUTE]),
    ("CoCa", "open_clip", "tiny", ["tests/bench/bench_coca.py", *TINY]),
    ("CoCa", "open_clip", "compute", ["tests/bench/bench_coca.py", *COMPUTE]),
    ("data: shards", "JSON files", "jpeg256", ["tests/bench/bench_data.py", "--rounds", "3", "--batches", "60"]),
]


def cells(summary):
    """(ours, peer, throughput ratio, memory) of a benchmark's JSON summary."""
    peer = next(k for k in ("open_clip", "lavis", "hf", "json") if k in summary)
    ours = summary["ours" if "ours" in summary else "shards"]
    if "samples_per_s" in ours:
        speed = (f"{ours['samples_per_s']:.1f} samples/s", f"{summary[peer]['samples_per_s']:.1f}")
    else:
        speed = (f"{ours['sec_per_step']:.4f} s/step", f"{summary[peer]['sec_per_step']:.4f}")
    if "memory_ratio" in summary:
        memory = (f"peak {ours['peak_mem_mb']:.0f} vs {summary[peer]['peak_mem_mb']:.0f} MB "
                  f"(**{summary['memory_ratio']:.2f}x**)")
    elif "training_memory_ratio" in summary:
        memory = (f"training {ours['training_MiB']:.0f} vs {summary[peer]['training_MiB']:.0f} MiB "
                  f"(**{summary['training_memory_ratio']:.2f}x**)")
    else:
        memory = ""
    return (*speed, f"**{summary['throughput_ratio']:.2f}x**", memory)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["tiny", "compute"], help="only these rows (and data loading)")
    args = p.parse_args()
    rows = [r for r in ROWS if not args.only or r[2] in (args.only, "jpeg256")]
    table = ["| method | peer | config | ours | peer | throughput ours/peer | memory ours/peer |",
             "|---|---|---|---|---|---|---|"]
    start = time.time()
    for method, peer, size, command in rows:
        t = time.time()
        proc = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True)
        if proc.returncode:
            table.append(f"| {method} | {peer} | {size} | failed: {proc.stderr.strip().splitlines()[-1][:80]} | | | |")
            print(proc.stderr[-2000:], file=sys.stderr)
            continue
        summary = json.loads(proc.stdout.strip().splitlines()[-1])
        row = f"| {method} | {peer} | {size} (`python {' '.join(command)}`) | " + " | ".join(cells(summary)) + " |"
        table.append(row)
        print(row, f"({time.time() - t:.0f} s)", file=sys.stderr, flush=True)
    print(f"\n{time.strftime('%Y-%m-%d')}, {platform.machine()} {os.cpu_count()} cores, {time.time() - start:.0f} s in all\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
