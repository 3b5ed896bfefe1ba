"""Where the offline stand-ins for the Hub live: a small pretrained CLIP and mini MTIL datasets.

One rule resolves the folder: an explicit path, then `HF_MOE_CL_ASSETS`, then `../shared/assets` beside the repository
checkout (never the working directory). Without the assets, the `mini-hub` preset builds the same six tasks from the
Hub.
"""

from __future__ import annotations

import os
from pathlib import Path

ASSETS_ENV = "HF_MOE_CL_ASSETS"
# What the folder holds, relative to it.
PROXY_CLIP = Path("proxy-clip")  # a small CLIPModel pretrained on real 32x32 images, with the real CLIP tokenizer
MINI_MTIL = Path("mini-mtil")  # one `datasets.load_from_disk` folder per task
REFERENCE_IMAGES = Path("reference") / "tinyimagenet-ref"  # Tiny ImageNet images: DDAS's reference set
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_ASSETS = REPO_ROOT.parent / "shared" / "assets"


class AssetsNotFoundError(FileNotFoundError):
    """The assets folder is missing; the message names it and the fix, one line each."""


def assets_dir(path: str | os.PathLike | None = None) -> Path:
    """Resolve the assets folder: explicit path, then $HF_MOE_CL_ASSETS, then ../shared/assets of the repo."""
    chosen = Path(path or os.environ.get(ASSETS_ENV) or DEFAULT_ASSETS)
    if not chosen.is_dir():
        raise AssetsNotFoundError(
            f"The assets folder {chosen} (proxy CLIP, mini-MTIL tasks, reference images) does not exist.\n"
            f"Fix: pass its path (--assets_dir) or set ${ASSETS_ENV}; without the assets, run the same six tasks "
            "from the Hub with --preset mini-hub (docs/quickstart.md).")
    return chosen
