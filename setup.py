"""Build: pure-Python package; the CUDA module lora_kernels._C is added by CMake when nvcc exists."""

from setuptools import setup

setup()
