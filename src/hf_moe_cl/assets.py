"""Where the offline stand-ins for the Hub live: a small pretrained CLIP and mini MTIL datasets.

The default is `../shared/assets` beside the repository checkout; `HF_MOE_CL_ASSETS` or an explicit path overrides it.
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


def assets_dir(path: str | os.PathLike | None = None) -> Path:
    """Resolve the assets folder: explicit path, then $HF_MOE_CL_ASSETS, then ../shared/assets of the repo."""
    chosen = Path(path or os.environ.get(ASSETS_ENV) or REPO_ROOT.parent / "shared" / "assets")
    if not chosen.is_dir():
        raise FileNotFoundError(
            f"Assets folder {chosen} does not exist: pass its path (e.g. --assets_dir) or set ${ASSETS_ENV}."
        )
    return chosen
