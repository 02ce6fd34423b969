"""Defaults shared by the command line, the flows and the library, in a module that imports
nothing (``soap --help`` must not pay for torch). ``tests/test_cli_options.py`` checks that the
flows' and functions' own defaults agree with these."""

DEFAULT_BACKBONE = "dinov2_vits14"  # the embedded DINOv2 ViT-S/14: runs without any download
DEFAULT_DATA = "photos"  # bundled offline, unlike Fashion-MNIST (a Debian package)
DEFAULT_GENERATOR = "mixture"  # the paper's default synthetic set
DEFAULT_DTYPE = "float16"

# docs/method.md §1: μ = 2 components, τ = 0.05, γ = 1, SI threshold 0.75 for μ = auto
DEFAULT_MU = 2.0
DEFAULT_TAU = 0.05
DEFAULT_GAMMA = 1.0
DEFAULT_THRESHOLD = 0.75

# Below this many real images a fit still runs, but its response maps P are fractions over so few
# images that SI scores (and what they suppress) are mostly noise.
FEW_IMAGES = 32
