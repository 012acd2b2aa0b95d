"""``alignkit recipes``: the shipped recipe library, listed, and copied out as templates to edit.

Shipped recipes live in ``recipes/<model>/<stage>-<variant>.yaml`` (``_base/`` holds shared parts they
``extend``). A copy is standalone: the ``extends`` chain is merged into one file, headed by the original's
comments (the command and the hardware it was written for), so it can be edited and moved freely.

The library is found in two places: an installed wheel carries it inside the package (``alignkit/recipes``,
copied there by setup.py's build hook); a source checkout (an editable install, as ``make setup`` makes) has
it as the top-level ``recipes/`` folder next to ``src/``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from alignkit.errors import AlignkitError
from alignkit.recipe.loading import load_raw, load_recipe
from alignkit.suggest import did_you_mean


@dataclass(frozen=True)
class ShippedRecipe:
    """One recipe of the library."""

    name: str        # "qwen2.5-0.5b/sft-qlora"
    path: Path
    stage: str
    model: str
    summary: str     # the first line of its leading comment


def library_dir() -> Path:
    """The recipe library: ``ALIGNKIT_RECIPES`` if set; else the copy an installed wheel carries; else the
    ``recipes/`` folder of the source checkout this module runs from."""
    configured = os.environ.get("ALIGNKIT_RECIPES")
    if configured:
        if not Path(configured).is_dir():
            raise AlignkitError(f"ALIGNKIT_RECIPES={configured} is not a directory: point it at a recipes/ folder")
        return Path(configured)
    package = Path(__file__).resolve().parents[1]  # alignkit/, this module being alignkit/recipe/library.py
    # The installed wheel's copy (setup.py puts recipes/ into the package), then a checkout's src/alignkit.
    for path in (package / "recipes", package.parents[1] / "recipes"):
        if path.is_dir():
            return path
    raise AlignkitError(f"no recipe library: this alignkit install has no {package / 'recipes'} and does not run from "
                        "a source checkout; reinstall it from a wheel or a checkout (pip install .), or set "
                        "ALIGNKIT_RECIPES to the recipes/ folder of an alignkit checkout")


def shipped_recipes(root: Path | None = None) -> list[ShippedRecipe]:
    """Every recipe of the library (``_base`` parts left out), sorted by name."""
    root = root or library_dir()
    found = []
    for path in sorted(root.rglob("*.yaml")):
        if "_base" in path.relative_to(root).parts:
            continue
        raw = load_raw(path)
        found.append(ShippedRecipe(name=path.relative_to(root).with_suffix("").as_posix(), path=path,
                                   stage=str(raw.get("stage", "?")),
                                   model=str(raw.get("model", {}).get("name_or_path", "?")),
                                   summary=_leading_comment(path)[0] if _leading_comment(path) else ""))
    return found


def find(name: str, root: Path | None = None) -> ShippedRecipe:
    """The library recipe called ``name`` (with or without ``.yaml``)."""
    recipes = {recipe.name: recipe for recipe in shipped_recipes(root)}
    key = name.removesuffix(".yaml").removeprefix("recipes/")
    if key not in recipes:
        raise AlignkitError(f"no shipped recipe '{name}'.{did_you_mean(key, recipes)} List them with: "
                            "alignkit recipes")
    return recipes[key]


def copy_recipe(name: str, destination: Path, *, overwrite: bool = False, root: Path | None = None) -> Path:
    """Write the library recipe ``name`` to ``destination`` as one standalone file (its ``extends`` merged
    in, its header comments kept) and check that the copy validates. Returns the path written."""
    recipe = find(name, root)
    destination = Path(destination)
    if destination.is_dir():
        destination = destination / recipe.path.name
    if destination.is_dir():  # --overwrite replaces a file, never a directory and what it holds
        raise AlignkitError(f"{destination} is a directory; choose another destination file")
    if destination.exists() and not overwrite:
        raise AlignkitError(f"{destination} already exists; pass --overwrite to replace it")
    header = [f"# {line}" if line else "#" for line in _leading_comment(recipe.path)]
    header.append(f"# Copied from recipes/{recipe.name}.yaml by `alignkit recipes --copy` (extends merged in: "
                  "this file stands alone).")
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.write_text("\n".join(header) + "\n" + yaml.safe_dump(load_raw(recipe.path), sort_keys=False))
    load_recipe(destination)  # a copy that does not validate is a bug here, not the user's problem
    return destination


def _leading_comment(path: Path) -> list[str]:
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.removeprefix("#").removeprefix(" ").rstrip())
    return lines
