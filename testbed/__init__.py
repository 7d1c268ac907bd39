"""The testbed: a tiny, really trained, biased text-to-image world that runs on a CPU.

It stands in for Stable Diffusion plus a face-attribute classifier so that tests, benchmarks
and the quick start run offline with real numbers through the same diffusers code path.
"""

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
PIPELINE_DIR = WEIGHTS_DIR / "pipeline"
CLASSIFIER_DIR = WEIGHTS_DIR / "classifier"
BASE_MODEL_ID = "fairdiff-testbed"
# the one place a base-model name (FAIRDIFF_BASE_MODEL) becomes an embedded pipeline folder
BASE_MODEL_NAME = "testbed"  # what FAIRDIFF_BASE_MODEL names it (common.settings.TESTBED)
EMBEDDED_PIPELINES = {BASE_MODEL_NAME: PIPELINE_DIR}
