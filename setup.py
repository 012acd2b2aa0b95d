"""Build hook: the wheel carries the recipe library.

The library lives in the top-level ``recipes/`` folder, where the docs and a checkout's users find it; a
plain ``pip install`` gets a copy as ``alignkit/recipes/`` inside the package, which is where
``alignkit.recipe.library`` looks first. Everything else about the build is declared in pyproject.toml.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

RECIPES = Path(__file__).resolve().parent / "recipes"


class BuildPyWithRecipes(build_py):
    """``build_py`` that also copies ``recipes/`` into the built package as ``alignkit/recipes``."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install reads the checkout's recipes/ in place
            return
        shutil.copytree(RECIPES, Path(self.build_lib) / "alignkit" / "recipes", dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


setup(cmdclass={"build_py": BuildPyWithRecipes})
