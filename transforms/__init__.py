"""medfl's shipped transform recipes (YAML, medfl.data.recipes reads them), kept at the top of the repository.

This folder is installed as the package `medfl.recipes` (pyproject.toml maps it): a wheel carries the recipes
as package data, and an editable install (`make`) finds them here. The file makes the folder a regular
package, which setuptools' editable installs need in order to map it; it holds no code.
"""
