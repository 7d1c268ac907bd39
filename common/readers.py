"""Which reader audits and which steers, per base-model profile (torch-free: the gateway may ask).

A profile with two attribute readers audits with one and steers (classifier guidance, DFT, IDA's
calibration) with the other, so an audit never grades its own steering: the testbed audits with its
tiny CLIP and steers with its CNN. A real Stable Diffusion gets what the operator configures; where it
has one reader (FAIRDIFF_CLASSIFIER only), that reader does both and every result says so.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.settings import TESTBED_MODELS, has_attribute_classifier

# reader settings the testbed profiles resolve 'auto' to
TESTBED_AUDIT_READER = "testbed-clip"
TESTBED_STEER_READER = "testbed-cnn"
SAME_AS_CLASSIFIER = "classifier"


@dataclass(frozen=True)
class ReaderChoice:
    """Reader settings after 'auto' is resolved: 'none', a testbed reader's name, a folder, or 'classifier'."""

    audit: str
    steer: str

    @property
    def audit_is_steer(self) -> bool:
        return self.audit == SAME_AS_CLASSIFIER or (self.audit == self.steer and self.audit != "none")


def reader_choice(classifier: str, audit_reader: str, base_model: str) -> ReaderChoice:
    """Resolve FAIRDIFF_CLASSIFIER (the steering reader) and FAIRDIFF_AUDIT_READER for a base model."""
    testbed = base_model in TESTBED_MODELS
    if not has_attribute_classifier(classifier, base_model):
        steer = "none"
    else:
        steer = TESTBED_STEER_READER if classifier == "auto" else classifier
    if audit_reader == "auto":
        audit = TESTBED_AUDIT_READER if testbed and steer != "none" else SAME_AS_CLASSIFIER
    else:
        audit = audit_reader
    if audit == SAME_AS_CLASSIFIER and steer == "none":
        audit = "none"
    return ReaderChoice(audit=audit, steer=steer)
