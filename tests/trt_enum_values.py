"""TensorRT enum values for tests of pure helpers that take the enum as an argument (no TensorRT here)."""
import enum


# The enum members as TensorRT's bindings define them (NvInfer.h / pyCore.cpp of 10.13 and 11.x):
# 11.0 renumbered the network flags and removed weak typing with BuilderFlag.FP16/BF16.
class CreationFlag10(enum.IntEnum):
    EXPLICIT_BATCH = 0
    STRONGLY_TYPED = 1
    PREFER_JIT_PYTHON_PLUGINS = 2
    PREFER_AOT_PYTHON_PLUGINS = 3


class CreationFlag11(enum.IntEnum):
    STRONGLY_TYPED = 0  # deprecated, ignored: every network is strongly typed
    PREFER_JIT_PYTHON_PLUGINS = 1
    PREFER_AOT_PYTHON_PLUGINS = 2


class BuilderFlag10(enum.IntEnum):
    FP16 = 0
    BF16 = 17
    DEBUG = 2


class BuilderFlag11(enum.IntEnum):
    DEBUG = 2
    TF32 = 7
