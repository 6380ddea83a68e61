"""hhjax: transfer learning with Keras-exact backbones (InceptionV3, VGG, ResNet, Xception) in
JAX/Flax."""

__version__ = "0.1.0"
