"""Type stub of the compiled `native.ood` (see ood.pyx; reference: gateway.ood.scoring.reference_scores)."""

import numpy as np
import numpy.typing as npt

class Kernel:
    n_features: int
    top_k: int
    def __init__(
        self, mean: npt.ArrayLike, inverse_covariance: npt.ArrayLike, scale: npt.ArrayLike, top_k: int
    ) -> None: ...
    def score(
        self,
        rows: npt.NDArray[np.float32],
        scores: npt.NDArray[np.float64],
        top_index: npt.NDArray[np.intp],
        top_z: npt.NDArray[np.float64],
    ) -> float: ...
