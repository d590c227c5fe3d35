import subprocess
import sys


def test_import_pulls_no_heavy_dependency():
    code = (
        "import sys, miles_envs, miles_envs.registry, miles_envs.engine, miles_envs.agents.factory\n"
        "heavy = {'torch', 'transformers', 'ray', 'sglang', 'pyarrow', 'docker', 'megatron'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_side_folders_live_only_inside_the_namespace():
    code = "import importlib.util as u; print([n for n in ('agents','registry','sandbox','trainer') if u.find_spec(n)])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == "[]"
