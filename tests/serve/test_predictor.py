"""The predictor loaded from its folder: raw images in, the trial's own probit GLM probabilities out."""

import numpy as np
import pytest

from distlap.serve.predictor import InputError, Predictor, _load_pyfunc


def test_predict_on_raw_images_equals_the_studys_predictive(predictor_folder, trial_folder):
    ft, study = trial_folder.ft, trial_folder.study
    own = study.predictive(ft.loader("test"), {"late": study.subsets["late"]}).subsets["late"].numpy()
    images = ft.splits.test.tensors[0][:, 0].numpy()  # (N, 28, 28) uint8
    probs = _load_pyfunc(str(predictor_folder)).predict(images)
    assert probs.dtype == np.float32 and probs.shape == own.shape
    assert np.abs(probs - own).max() <= 1e-6


def test_batches_larger_than_one_chunk_give_the_same_probabilities(predictor_folder, trial_folder):
    predictor = Predictor.load(predictor_folder)
    pair = trial_folder.ft.splits.test.tensors[0][:2, 0].numpy()
    probs = predictor.predict(np.tile(pair, (150, 1, 1)))  # 300 images: two chunks of at most 256
    first = predictor.predict(pair)
    np.testing.assert_allclose(probs, np.tile(first, (150, 1)), atol=1e-6)


@pytest.mark.parametrize(
    "images", [np.zeros((28, 28), np.uint8), np.zeros((0, 28, 28), np.uint8), [[1, 2], [3, 4]]]
)
def test_what_is_not_a_batch_of_images_is_refused(predictor_folder, images):
    with pytest.raises(InputError) as err:
        Predictor.load(predictor_folder).predict(images)
    assert "\n" not in str(err.value)
