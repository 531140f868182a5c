"""Packaging glue that pyproject.toml cannot express on its own.

The checkout keeps two top-level folders that belong inside the installed package:

* ``search_spaces/`` (the one copy a user edits) is shipped as ``mtl_tune/search_spaces/``;
* ``toy/`` (``python -m toy.trajectories`` in a checkout) is shipped as ``mtl_tune._toy``,
  so a wheel installs nothing under the generic top-level name ``toy``
  (``mtl-tune toy`` runs it).

Both are plain ``package_dir`` mappings: no copies or symlinks in the repository.
"""

from setuptools import find_packages, setup

TOY = ["mtl_tune._toy" + name[len("toy"):] for name in find_packages(include=["toy", "toy.*"])]

setup(
    packages=find_packages(include=["mtl_tune", "mtl_tune.*"]) + TOY + ["mtl_tune.search_spaces"],
    package_dir={"mtl_tune._toy": "toy", "mtl_tune.search_spaces": "search_spaces"},
    package_data={"mtl_tune": ["py.typed"], "mtl_tune.search_spaces": ["*.yaml", "README.md"]},
)
