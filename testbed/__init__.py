"""The testbed: a tiny, really trained, biased text-to-image world that runs on a CPU.

It stands in for Stable Diffusion plus a face-attribute classifier so that tests, benchmarks
and the quick start run offline with real numbers through the same diffusers code path.
"""

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
PIPELINE_DIR = WEIGHTS_DIR / "pipeline"
CLASSIFIER_DIR = WEIGHTS_DIR / "classifier"
# the shared-axis variant (testbed.shared_axis), for measuring whether a finetune generalises
SHARED_AXES_PIPELINE_DIR = WEIGHTS_DIR / "pipeline_shared_axes"
# its neutral-looks form: every look's words average the same shares (testbed.shared_axis)
NEUTRAL_LOOKS_PIPELINE_DIR = WEIGHTS_DIR / "pipeline_neutral_looks"
BASE_MODEL_ID = "fairdiff-testbed"
