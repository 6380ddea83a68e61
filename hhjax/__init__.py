"""hhjax: transfer learning with a Keras-exact InceptionV3 in JAX/Flax."""

__version__ = "0.1.0"
