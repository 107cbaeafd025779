#!/usr/bin/env bash
# Salesforce LAVIS 1.0.2 (the official BLIP / ALBEF / BLIP-2 code) in its own virtual environment,
# from PyPI only, for tests/lavis/check_blip.py, tests/lavis/check_albef.py and tests/bench/bench_lavis.py. LAVIS needs
# transformers 4.26 and numpy 1, so it cannot share the project's environment.
#
#     bash tests/lavis/setup.sh                         # venv at ~/.cache/blip-lavis-peer/venv
#     LAVIS_VENV=/some/where bash tests/lavis/setup.sh
#
# Idempotent: a second run checks the pins and the imports and installs nothing new.
#
# torch: by default the LAVIS environment borrows torch and torchvision (and what they need,
# numpy excepted) from the project's .venv by symbolic links, in a folder of its own that a
# .pth file appends to sys.path: it saves installing ~5 GB again (~2.5 min), and both sides
# of a benchmark then run the same torch build. TORCH_FROM=/path/to/python names another
# donor interpreter; TORCH_FROM=none (or no usable donor) installs torch from PyPI instead.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/blip-lavis-peer"
LAVIS_VENV="${LAVIS_VENV:-$CACHE/venv}"
TORCH_FROM="${TORCH_FROM:-$ROOT/.venv/bin/python}"
PY="$LAVIS_VENV/bin/python"
pip_install() {  # quiet; drops pip's notes that LAVIS's unused requirements (spacy, streamlit, ...) are missing
  "$PY" -m pip install -q --disable-pip-version-check "$@" 2>&1 | \
    { grep -v -e "^salesforce-lavis 1.0.2 requires" -e "dependency resolver does not currently take" || true; }
}

[ -x "$PY" ] || python3 -m venv "$LAVIS_VENV"
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
LINKS="$LAVIS_VENV/borrowed-torch"

# 1. torch + torchvision
same_python() {  # the donor exists and has the same Python minor version (compiled wheels)
  [ "$TORCH_FROM" != none ] && [ -x "$TORCH_FROM" ] && \
    [ "$("$TORCH_FROM" -c 'import sys; print(sys.version_info[:2])')" = "$("$PY" -c 'import sys; print(sys.version_info[:2])')" ] && \
    "$TORCH_FROM" -c 'import torch, torchvision' 2>/dev/null
}
if same_python; then
  # a torch installed into the environment itself (TORCH_FROM=none before) would shadow the links
  [ ! -d "$SITE/torch" ] || "$PY" -m pip uninstall -q -y torch torchvision
  rm -rf "$LINKS" && mkdir -p "$LINKS"
  "$TORCH_FROM" "$HERE/borrow_torch.py" "$LINKS"
  echo "$LINKS" > "$SITE/borrowed_torch.pth"
else
  rm -rf "$LINKS" "$SITE/borrowed_torch.pth"
  pip_install torch torchvision
fi

# 2. LAVIS itself, without its 28 requirements (spacy, streamlit, plotly, pre-commit, ...: most
#    are not used by the model code; step 3 installs those that are imported).
pip_install --no-deps "salesforce-lavis==1.0.2"

# 3. What `import lavis.models` really needs, at LAVIS's own pins where they install:
#    transformers 4.26 (LAVIS: >=4.25,<4.27) with a prebuilt tokenizers; numpy 1 (albef_pretrain
#    uses np.Inf, removed in numpy 2); timm 0.4.12 (LAVIS's pin; the project's timm 1.x moved
#    the layers LAVIS imports); opencv built for numpy 1.
pip_install "numpy==1.26.4" "transformers==4.26.1" "tokenizers==0.13.3" "timm==0.4.12" wheel
#    fairscale 0.4.4 is a source distribution whose setup.py imports torch: no build isolation.
pip_install --no-build-isolation "fairscale==0.4.4"
#    lavis/__init__.py also imports its datasets, processors and tasks.
pip_install "omegaconf==2.4.0" "iopath==0.1.10" "einops==0.8.2" "contexttimer==0.3.3" \
  "webdataset==1.0.2" "ftfy==6.3.1" "opencv-python-headless==4.5.5.64" "pandas==2.2.3" \
  "pycocotools==2.0.11" "pycocoevalcap==1.2" "decord==0.6.0"
#    Not installed: spacy (only lavis.models.img2prompt_models imports it; tests/lavis/peer.py
#    puts a stub in its place), streamlit, plotly, opendatasets, sentencepiece, scikit-image.

cd "$ROOT" && "$PY" -c "
from tests.lavis import peer; peer.import_lavis(); import lavis.models, numpy, torch, transformers, timm
print('LAVIS environment OK:', '$LAVIS_VENV', '| torch', torch.__version__, '| transformers',
      transformers.__version__, '| numpy', numpy.__version__, '| timm', timm.__version__)"
