"""``photos``: real photos available offline (scikit-image, scikit-learn, opencv-doc), in a fixed order."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re

from soapflow.errors import SoapError
from soapflow.sources.base import IMAGE_EXTENSIONS
from soapflow.sources.files import FileSource
from soapflow.transforms import open_image

OPENCV_DOC_DATA = "/usr/share/doc/opencv-doc/examples/data"

# Photos inside the scikit-image wheel (the pooch-fetched ones are not used).
# Left out: synthetic or drawn images (chessboard_*, color, horse, logo, phantom,
# multipage*.tif, the gif) and motorcycle_right (stereo partner of the left view).
SKIMAGE_PHOTOS = (
    "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png",
    "clock_motion.png", "coffee.png", "coins.png", "grass.png", "gravel.png",
    "hubble_deep_field.jpg", "ihc.png", "microaneurysms.png", "moon.png",
    "motorcycle_left.png", "page.png", "retina.jpg", "rocket.jpg", "text.png",
)  # fmt: skip
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")
# opencv-doc sample files that are not photos (logos, drawings, renders, a
# painting, masks/templates, text or digit sheets, a disparity map) ...
OPENCV_NON_PHOTOS = frozenset(
    """LinuxLogo.jpg WindowsLogo.jpg opencv-logo.png opencv-logo-white.png
    HappyFish.jpg Blender_Suzanne1.jpg Blender_Suzanne2.jpg aloeGT.png blox.jpg
    cards.png chessboard.png detect_blob.png digits.png ellipses.jpg gradient.png
    imageTextN.png imageTextR.png mask.png ml.png notes.png pic1.png pic2.png
    pic3.png pic4.png pic5.png pic6.png starry_night.jpg templ.png tmpl.png""".split()
)
# ... and near-duplicates: the second view of stereo / optical-flow / tampering
# pairs, and the chessboard calibration series (left01..right14).
OPENCV_NEAR_DUPLICATES = frozenset(
    "aloeR.jpg right.jpg basketball2.png rubberwhale2.png ela_modified.jpg "
    "leuvenB.jpg graf3.png".split()
)
_OPENCV_CALIBRATION = re.compile(r"^(left|right)\d\d\.jpg$", re.IGNORECASE)
MIN_PHOTO_SIDE = 64


def _package_dir(module: str, *sub: str) -> str | None:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    d = os.path.join(list(spec.submodule_search_locations)[0], *sub)
    return d if os.path.isdir(d) else None


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _opencv_photos(data_dir: str | None = None) -> list[tuple[str, str]]:
    data_dir = OPENCV_DOC_DATA if data_dir is None else data_dir
    if not os.path.isdir(data_dir):
        return []
    out = []
    for name in sorted(os.listdir(data_dir)):
        base = name[:-3] if name.lower().endswith(".gz") else name
        if not base.lower().endswith(IMAGE_EXTENSIONS):
            continue
        if base in OPENCV_NON_PHOTOS or base in OPENCV_NEAR_DUPLICATES or _OPENCV_CALIBRATION.match(base):
            continue
        path = os.path.join(data_dir, name)
        try:  # header only: drop icons
            with open_image(path) as im:
                if min(im.size) < MIN_PHOTO_SIDE:
                    continue
        except Exception:
            pass  # keep it; the pre-scan will list it as skipped with a reason
        out.append((f"opencv-doc/{base}", path))
    return out


def photo_entries() -> tuple[list[tuple[str, str]], dict]:
    """Ordered ``[(name, path)]`` of the offline photos, and counts per origin."""
    entries: list[tuple[str, str]] = []
    counts = {}
    sk = _package_dir("skimage", "data")
    got = [(f"scikit-image/{f}", os.path.join(sk, f)) for f in SKIMAGE_PHOTOS if sk and os.path.isfile(os.path.join(sk, f))]
    counts["scikit-image"] = len(got)
    entries += got
    sl = _package_dir("sklearn", "datasets", "images")
    got = [(f"scikit-learn/{f}", os.path.join(sl, f)) for f in SKLEARN_PHOTOS if sl and os.path.isfile(os.path.join(sl, f))]
    counts["scikit-learn"] = len(got)
    entries += got
    got = _opencv_photos()
    counts["opencv-doc"] = len(got)
    entries += got
    return entries, counts


def _open_photos(spec: str, n: int | None) -> FileSource:
    entries, counts = photo_entries()
    if not entries:
        raise SoapError(
            "no offline photos found: install scikit-image / scikit-learn "
            "(or `apt-get install opencv-doc`) to use the `photos` source"
        )
    extra = {
        "origins": counts,
        "versions": {
            "scikit-image": _dist_version("scikit-image"),
            "scikit-learn": _dist_version("scikit-learn"),
            "opencv-doc": counts["opencv-doc"] > 0,
        },
    }
    return FileSource(spec, "photos", entries, n=n, origin="photos", extra=extra)
