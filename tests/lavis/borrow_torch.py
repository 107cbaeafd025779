"""Link torch, torchvision and the distributions they need from the Python running this script
into one folder, for the LAVIS environment to put on its sys.path (setup.sh, step 1):

    /path/to/project/.venv/bin/python tests/lavis/borrow_torch.py DEST

Links every top-level entry (package folders, modules, .dist-info) of each distribution, so that
pip in the LAVIS environment sees them as installed and leaves them alone (they are outside its
site-packages: pip never uninstalls them). numpy is not linked: LAVIS needs numpy 1, torch works
with either. Requirements are followed with the extras they ask for (torch needs
cuda-toolkit[cublas,cufft,...]); those not installed here (markers for other platforms) are skipped."""
import importlib.metadata as md
import os
import re
import sys

SKIP = {"numpy"}


def closure(roots):
    """{distribution name: Distribution} for roots and their installed requirements."""
    found, todo, done = {}, [(r, frozenset()) for r in roots], set()
    while todo:
        name, extras = todo.pop()
        name = re.sub(r"[-_.]+", "-", name).lower()
        if name in SKIP or (name, extras) in done:
            continue
        done.add((name, extras))
        try:
            dist = found.get(name) or md.distribution(name)
        except md.PackageNotFoundError:
            continue
        found[name] = dist
        for req in dist.requires or []:          # 'name[extra,...] (>=1.0) ; marker'
            head = re.match(r"\s*([A-Za-z0-9_.-]+)\s*(?:\[([^\]]*)\])?", req)
            wanted = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", req)
            if wanted is None or wanted.group(1) in extras:
                todo.append((head.group(1), frozenset(e.strip() for e in (head.group(2) or "").split(",") if e.strip())))
    return found


def main(dest):
    os.makedirs(dest, exist_ok=True)
    found = closure(["torch", "torchvision"])
    for dist in found.values():
        for top in {str(f).split("/")[0] for f in dist.files or [] if not str(f).startswith("..")}:
            src, link = os.path.join(str(dist.locate_file("")), top), os.path.join(dest, top)
            if os.path.exists(src) and not os.path.lexists(link):
                os.symlink(src, link)
    print(f"torch from {sys.prefix}: {', '.join(sorted(found))}")


if __name__ == "__main__":
    main(sys.argv[1])
