"""What every test under tests/gpu carries: the ``gpu`` marker and a skip without a CUDA device."""

import pytest

torch = pytest.importorskip("torch")

GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
