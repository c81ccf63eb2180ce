"""A model's answer as a prediction: the label its probabilities give (sigmoid threshold or
argmax), a series' from its images' answers, and for a segmentation, positive when a lesion
large enough to report was found."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline.core.contract import Activation, ModelContract
from pipeline.core.results import Prediction
from pipeline.inference.segment import Segmentation


def decide(contract: ModelContract, probabilities: np.ndarray) -> Prediction:
    probs = {
        label: round(float(p), 6) for label, p in zip(contract.labels, probabilities, strict=True)
    }
    if contract.activation is Activation.SIGMOID:
        label = contract.labels[1] if probabilities[1] >= contract.threshold else contract.labels[0]
    else:
        label = contract.labels[int(np.argmax(probabilities))]
    return Prediction(label=label, probabilities=probs)


def decide_series(contract: ModelContract, images: Sequence[Prediction]) -> Prediction:
    """A series' answer from its images': for a sigmoid model the image most likely
    positive (one positive view makes the series positive), for a softmax model the label of
    the images' mean probabilities."""
    if contract.activation is Activation.SIGMOID:
        return max(images, key=lambda p: p.probabilities[contract.labels[1]])
    mean = np.mean([[p.probabilities[label] for label in contract.labels] for p in images], axis=0)
    return decide(contract, mean)


def decide_segmentation(contract: ModelContract, seg: Segmentation) -> Prediction:
    """Positive when a lesion large enough to report was found; the probability is the
    highest foreground probability anywhere."""
    lesion = float(seg.max_probability)
    return Prediction(
        label=contract.labels[1] if seg.lesions else contract.labels[0],
        probabilities={
            contract.labels[0]: round(1.0 - lesion, 6),
            contract.labels[1]: round(lesion, 6),
        },
    )
