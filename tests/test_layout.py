"""Run from a clone's root, no folder of ours shadows an installed package of the same name."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ('adapters', 'kernels', 'retrofit', 'cli', 'evals', 'tests', 'bench', 'docs')


def test_top_level_folders_are_not_regular_packages():
    assert [f for f in FOLDERS if (ROOT / f / '__init__.py').exists()] == []


def test_installed_package_wins_over_a_folder_of_the_same_name(tmp_path):
    # stand-ins for installed packages named like our folders (transformers imports Hugging Face's `kernels`)
    for name in ('kernels', 'adapters'):
        (tmp_path / name).mkdir()
        (tmp_path / name / '__init__.py').write_text('INSTALLED = True\n')
    code = 'import hola_retrofit, kernels, adapters; print(kernels.INSTALLED and adapters.INSTALLED)'
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    r = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().endswith('True')
