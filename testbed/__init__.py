"""The testbed: a tiny, really trained, biased text-to-image world that runs on a CPU.

It stands in for Stable Diffusion plus a face-attribute classifier so that tests, benchmarks
and the quick start run offline with real numbers through the same diffusers code path.
"""

from pathlib import Path

from common.settings import TESTBED, TESTBED_NEUTRAL_LOOKS, TESTBED_SHARED_AXES

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
PIPELINE_DIR = WEIGHTS_DIR / "pipeline"
CLASSIFIER_DIR = WEIGHTS_DIR / "classifier"
# the shared-axis variant (testbed.shared_axis), for measuring whether a finetune generalises
SHARED_AXES_PIPELINE_DIR = WEIGHTS_DIR / "pipeline_shared_axes"
# its neutral-looks form: every look's words average the same shares (testbed.shared_axis)
NEUTRAL_LOOKS_PIPELINE_DIR = WEIGHTS_DIR / "pipeline_neutral_looks"
BASE_MODEL_ID = "fairdiff-testbed"
# the one place a base-model name (FAIRDIFF_BASE_MODEL) becomes an embedded pipeline folder
EMBEDDED_PIPELINES = {
    TESTBED: PIPELINE_DIR,
    TESTBED_SHARED_AXES: SHARED_AXES_PIPELINE_DIR,
    TESTBED_NEUTRAL_LOOKS: NEUTRAL_LOOKS_PIPELINE_DIR,
}
