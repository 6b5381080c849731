"""The package's build backend (pyproject.toml's build-system): setuptools', with its build folder
emptied before each wheel. setuptools copies the sources into .cache/build and packs that whole
folder, so a file removed from the checkout would still be shipped from an earlier build."""
import shutil

from setuptools import build_meta
from setuptools.build_meta import *  # noqa: F403 (every hook setuptools defines, unchanged but one)

BUILD_BASE = ".cache/build"  # pyproject.toml's [tool.distutils.build] build-base


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    shutil.rmtree(BUILD_BASE, ignore_errors=True)
    return build_meta.build_wheel(wheel_directory, config_settings, metadata_directory)
