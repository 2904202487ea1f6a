"""The radiomics recipe's segmenter: the version it records is the version it runs, unknown versions are
refused by name, and ``describe()`` says what sets the scale of a project-trained cellpose model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_rapacl import segmentation as seg
from napari_rapacl._errors import RapaclInputError
from napari_rapacl.radiomics import NucleusSegmenter, RadiomicsRecipe
from napari_rapacl.testing import synthetic_he_nuclei


def test_segmenter_records_and_runs_its_version():
    assert NucleusSegmenter().version == seg.SEGMENTATION_VERSION == "3"
    old = NucleusSegmenter.from_dict({"method": "classical", "diameter_um": 8, "model": None, "version": 2})
    assert old.version == "2" and old.to_dict()["version"] == "2"  # a number read from YAML/JSON
    assert old.cache_key != NucleusSegmenter().cache_key
    rgb, _ = synthetic_he_nuclei((256, 256), mpp=0.5, n_nuclei=20, seed=1)
    np.testing.assert_array_equal(old(rgb, 0.5), seg.segment_nuclei(rgb, 0.5, version="2"))
    assert old.describe() == "classical (diameter 8 um, segmentation v2)"


def test_recipe_of_a_kept_version_is_accepted_and_an_unknown_one_named():
    for version in ("2", "3"):
        RadiomicsRecipe(segmenter=NucleusSegmenter(version=version)).check_current("model.pt")
    recipe = RadiomicsRecipe(segmenter=NucleusSegmenter(version="1"))
    with pytest.raises(
        RapaclInputError,
        match=r"model\.pt: .*segmentation version 1, .*versions 2, 3 only.*training\.radiomics_tables",
    ):
        recipe.check_current("model.pt")
    with pytest.raises(RapaclInputError, match=r"version '1' is not available.*versions 2, 3"):
        recipe.segmenter(np.full((32, 32, 3), 200, np.uint8), 0.5)


def test_describe_a_project_cellpose_model_by_its_sidecar(cellpose_models):
    """The project model runs at its training pixel size with its own size filter (its
    ``<model>.rapacl.json``), not at ``diameter_um``: describe() says that, not "diameter 8 um"."""
    name = seg.PROJECT_NUCLEI_MODEL
    text = NucleusSegmenter("cellpose", model=name).describe()
    assert "diameter" not in text and "not built on this machine" in text and name in text, text

    (cellpose_models / name).write_bytes(b"weights")  # describe() reads the sidecar only
    (cellpose_models / f"{name}.rapacl.json").write_text(json.dumps({"train_mpp": 0.3, "min_area_um2": 4.0}))
    expected = f"cellpose (model {name}, run at its training 0.3 um/px, nuclei >= 4 um^2, segmentation v3)"
    assert NucleusSegmenter("cellpose", model=name).describe() == expected
    # the default cellpose model is the project model once it is built
    assert NucleusSegmenter("cellpose").describe() == expected
    # a model file of the user's with a sidecar of its own
    other = cellpose_models.parent / "mine"
    other.write_bytes(b"weights")
    other.with_name("mine.rapacl.json").write_text(json.dumps({"train_mpp": 0.5}))
    text = NucleusSegmenter("cellpose", model=str(other)).describe()
    assert text == f"cellpose (model {other}, run at its training 0.5 um/px, segmentation v3)"
    # a cellpose model without a sidecar runs at diameter_um
    plain = cellpose_models.parent / "plain"
    plain.write_bytes(b"weights")
    text = NucleusSegmenter("cellpose", diameter_um=7, model=str(plain)).describe()
    assert text == f"cellpose (model {plain}, diameter 7 um, segmentation v3)"
