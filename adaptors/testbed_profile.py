"""The embedded testbed's base-model profile: its pipeline, wording, readers and subject reader.

The only product module besides the CNN head reader that names the testbed; adaptors.profiles
imports it by name on first use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from adaptors.profiles import BaseModelProfile, register_profile


def _testbed_profile() -> BaseModelProfile:
    import testbed
    from testbed import world
    from testbed.data import write_caption_folder

    def cnn(device: Any) -> Any:
        from adaptors.classifiers import TestbedAttributeClassifier

        return TestbedAttributeClassifier(testbed.CLASSIFIER_DIR, device=device)

    def clip(device: Any) -> Any:
        from adaptors.readers.registry import load_reader_folder

        reader = load_reader_folder(testbed.WEIGHTS_DIR / "clip", device)
        reader.name = "testbed-clip"
        return reader

    clip.clip_folder = testbed.WEIGHTS_DIR / "clip"  # type: ignore[attr-defined]  (subject readers need the encoder)

    def class_texts() -> Any:
        from adaptors.assign import SUBJECT_PATTERN, ClassTexts

        return ClassTexts(
            words={a: dict(ws) for a, ws in world.CLASS_WORDS.items()},
            adjectives=("age", "gender"),
            with_attributes=("skin_tone",),
            subject_pattern=SUBJECT_PATTERN,
        )

    def oracle_subject() -> tuple[str, Callable[[Any], list[str | None]]]:
        from testbed.oracle import read_batch

        def read(images: Any) -> list[str | None]:  # images in [0, 1], as the trainers generate them
            return [r.occupation for r in read_batch(images.detach().float().cpu().numpy() * 2 - 1)]

        return "testbed oracle: occupation", read

    return BaseModelProfile(
        name=testbed.BASE_MODEL_NAME,
        aliases=(testbed.BASE_MODEL_ID,),
        prompt_sets={name: tuple(world.prompt_set(name) or ()) for name in world.PROMPT_SETS},
        held_out_sets=dict(world.HELD_OUT_SET),
        pipeline_path=testbed.PIPELINE_DIR,
        class_texts=class_texts,
        readers={"testbed-cnn": cnn, "testbed-clip": clip},
        steer_reader="testbed-cnn",
        subject_reader=oracle_subject,
        write_training_data=write_caption_folder,
    )


register_profile("testbed", _testbed_profile)
