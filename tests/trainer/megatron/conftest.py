import pytest

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install 'miles-envs[megatron]')")
