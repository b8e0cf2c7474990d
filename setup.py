"""Build hook: the shipped YAMLs (the repository's ``configs/``, one copy in git) go into the
wheel as package data, ``mdistiller_blockkd/configs/``. Everything else is in setup.cfg."""

import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


class BuildPyWithConfigs(build_py):
    """``build_py`` that also copies ``configs/**/*.yaml`` into the built package.

    Editable installs skip the copy: the package then runs from the source tree and
    finds ``configs/`` beside itself (``mdistiller_blockkd.config.config_dir``).
    """

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        src = os.path.join(HERE, "configs")
        dst = os.path.join(self.build_lib, "mdistiller_blockkd", "configs")
        for folder, _, files in os.walk(src):
            for name in sorted(files):
                if name.endswith((".yaml", ".yml")):
                    rel = os.path.relpath(os.path.join(folder, name), src)
                    os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
                    shutil.copyfile(os.path.join(folder, name), os.path.join(dst, rel))


setup(cmdclass={"build_py": BuildPyWithConfigs})
