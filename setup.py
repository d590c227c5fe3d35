"""Maps the side folders (agents/, registry/, sandbox/, trainer/) into the ``miles_envs`` namespace.

They are never installed as top-level packages: ``agents`` is the OpenAI Agents SDK's import name and
``registry`` is too common. pyproject.toml holds all other metadata.
"""

from setuptools import find_packages, setup

SIDE_FOLDERS = ("agents", "registry", "sandbox", "trainer")

packages = find_packages(include=["miles_envs", "miles_envs.*"])
package_dir = {"miles_envs": "miles_envs"}
for folder in SIDE_FOLDERS:
    package_dir[f"miles_envs.{folder}"] = folder
    packages.append(f"miles_envs.{folder}")
    packages += [f"miles_envs.{folder}.{sub}" for sub in find_packages(folder)]

setup(packages=packages, package_dir=package_dir)
