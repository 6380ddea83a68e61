"""The backbones a classifier may stand on, each declared once: `get(config.model.backbone)`.

    name          Keras                  endpoints (cuts)                         min  preprocessing
    inception_v3  InceptionV3            mixed0 ... mixed10                        75  inception
    vgg16, vgg19  VGG16, VGG19           block1_pool ... block5_pool               32  caffe
    resnet50/101/152  ResNet50/101/152   conv2_block1_out ... conv5_block3_out     32  caffe
    xception      Xception               block2_add ... block13_add,               71  inception
                                         block14_sepconv2_act
    efficientnet_b0 ... _b7              block1a_project_bn, ..., block2b_add,     32  raw
                  EfficientNetB0 ... B7  ..., top_activation (every block's output)
    mobilenet_v2, mobilenet_v2_0.35, _0.5,   expanded_conv_project_BN,                 32  inception
      _0.75, _1.3, _1.4                      block_1_project_BN, block_2_add, ...,
                  MobileNetV2(alpha=...)     out_relu (every block's output)

A `Backbone` says everything the rest of the code needs to know about a family, so that no
other module names one: how to build its Flax module, its endpoints in order (where a
classifier may cut and where fine-tuning may start; the module's top-level submodules are
'stem' (when it has one) and one per endpoint, so parameter paths read
`backbone/<endpoint>/...`), its minimum input size, Keras's `preprocess_input` for it, Keras's
official ImageNet files, the arguments Keras builds it with (MobileNetV2's alpha), how Keras's
weight files name its layers, and which of the speed rewrites (`hhjax.model.lowering.Lowering`) it has been verified with.

Adding a family: its Flax module, then one `Backbone(...)` in `_DECLARED` below.
"""

from collections.abc import Callable, Mapping
import dataclasses
from typing import Any

import flax.linen as nn

from hhjax import errors
from hhjax.model import efficientnet
from hhjax.model import inception
from hhjax.model import mobilenet_v2
from hhjax.model import resnet
from hhjax.model import vgg
from hhjax.model import xception
from hhjax.model.lowering import Lowering

DEFAULT = 'inception_v3'
_KERAS_APPLICATIONS = 'https://storage.googleapis.com/tensorflow/keras-applications/'


@dataclasses.dataclass(frozen=True)
class WeightsFile:
  """An official Keras weights file: where it is, its MD5 (Keras's `file_hash`; None where
  Keras's source gives none, as for MobileNetV2's files: such a file is taken unchecked)."""
  url: str
  md5: str | None
  size: int | None
  include_top: bool

  @property
  def filename(self) -> str:
    return self.url.rsplit('/', 1)[-1]


def _official(family: str, stem: str, notop_md5: str, top_md5: str,
              notop_size: int | None = None) -> dict[str, WeightsFile]:
  """Keras's two ImageNet files of a family: `<stem>.h5` (with top) and `<stem>_notop.h5`."""
  base = f'{_KERAS_APPLICATIONS}{family}/{stem}'
  return {'imagenet': WeightsFile(f'{base}_notop.h5', notop_md5, notop_size, False),
          'imagenet_top': WeightsFile(f'{base}.h5', top_md5, None, True)}


@dataclasses.dataclass(frozen=True, eq=False)   # one object per member: hashed by identity
class Backbone:
  """One backbone family member, as Keras builds it.

  Attributes:
    name: config.model.backbone's value, e.g. 'resnet50'.
    keras_name: the `keras.applications` function that builds it, e.g. 'ResNet50'.
    keras_args: what that function is called with beside the input and weights arguments
      (MobileNetV2's {'alpha': 0.35}); `keras_application` builds it so.
    module: (final_endpoint, include_top, num_classes, lowering, dtype, name) -> the Flax
      module; calling it on images returns {endpoint: features} up to final_endpoint (plus
      'predictions' with the top).
    endpoints: the names a cut and finetune.unfreeze_from may use, in network order.
    has_stem: whether layers before the first endpoint sit in a block of their own, 'stem'.
    min_size: the smallest square input Keras accepts.
    preprocessing: Keras's `preprocess_input` for it, as a name of
      `hhjax.model.preprocessing.NAMES` ('inception' is Keras's 'tf' mode).
    weights: Keras's official ImageNet files, 'imagenet' (no top) and 'imagenet_top'.
    keras_names: how Keras's weight files name the layers: 'position' (auto-numbered names,
      paired by position, in `keras_order`'s order) or 'name' (each layer by the name of its
      module; those in `unnamed` paired in order among the file's auto-named layers).
    keras_order: for keras_names='position': (final_endpoint, include_top) -> the module
      paths ('stem/conv_1a_3x3/conv', ...) of the layers with weights, in Keras's file order.
    unnamed: module name -> the class prefix of Keras's automatic name (conv2d,
      batch_normalization) for layers Keras leaves unnamed.
    top: the top-level modules of the classification top, in order.
    lowerings: the `Lowering` switches verified on this family; the others stay off.
    parity_endpoints: the endpoints compared with Keras (tests/test_backbones.py compares every
      endpoint).
    unnamed_endpoints: the endpoints whose Keras layer is unnamed (Xception's Add layers,
      `add`, `add_1`, ...), in order: the k-th is the k-th Add layer of the Keras model.
    drop_connect_rate: Keras's default drop-connect (stochastic depth) rate, for the families
      that have it (config.model.drop_connect_rate; the module takes it and a `dropout` call
      argument); None: the family has none.
    imagenet_variables: what Keras does to the official files' arrays when it builds the
      model with weights='imagenet' (EfficientNet's extra Rescaling), applied to them on load;
      None: nothing.
  """
  name: str
  keras_name: str
  module: Callable[..., nn.Module]
  endpoints: tuple[str, ...]
  has_stem: bool
  min_size: int
  preprocessing: str
  weights: Mapping[str, WeightsFile]
  keras_names: str = 'name'
  keras_order: Callable[[str, bool], list[str]] | None = None
  unnamed: Mapping[str, str] = dataclasses.field(default_factory=dict)
  top: tuple[str, ...] = ('predictions',)
  lowerings: frozenset[str] = frozenset()
  parity_endpoints: tuple[str, ...] = ()
  unnamed_endpoints: tuple[str, ...] = ()
  drop_connect_rate: float | None = None
  imagenet_variables: Callable[[Any], Any] | None = None
  keras_args: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def keras_application(self, keras_module, **kwargs):
    """`keras_module.applications.<keras_name>(**keras_args, **kwargs)`: the Keras model of
    this member, in Keras 3 or tf_keras (e.g. include_top=False, weights=None,
    input_shape=(S, S, 3))."""
    return getattr(keras_module.applications, self.keras_name)(**self.keras_args, **kwargs)

  @property
  def blocks(self) -> tuple[str, ...]:
    """The top-level blocks of the module: 'stem' (if any), then one per endpoint."""
    return (('stem',) if self.has_stem else ()) + self.endpoints

  def check_endpoint(self, endpoint: str, field: str = 'config.model.cut') -> None:
    if endpoint not in self.endpoints:
      raise errors.ConfigError(f'{field}={endpoint!r} is not an endpoint of {self.keras_name}; '
                               f'valid names are {list(self.endpoints)}.')

  def endpoints_to(self, cut: str) -> tuple[str, ...]:
    """The endpoints up to and including `cut`."""
    self.check_endpoint(cut)
    return self.endpoints[:self.endpoints.index(cut) + 1]

  def blocks_to(self, cut: str) -> tuple[str, ...]:
    """The blocks (stem included) up to and including `cut`: what a cut network holds."""
    self.check_endpoint(cut)
    return self.blocks[:self.blocks.index(cut) + 1]

  def keras_layer_order(self, final_endpoint: str | None = None,
                        include_top: bool = False) -> list[str]:
    """Module paths of the layers with weights up to `final_endpoint` (default: the last),
    in Keras's file order: entry k takes the k-th layer with weights of a Keras file."""
    if self.keras_order is None:
      raise ValueError(f'{self.keras_name} files pair layers by name, not by position.')
    return list(self.keras_order(final_endpoint or self.endpoints[-1], include_top))

  def lowering(self, lowering: Lowering) -> Lowering:
    """`lowering` with the rewrites not verified on this family turned off."""
    return Lowering(**{f.name: getattr(lowering, f.name) and f.name in self.lowerings
                       for f in dataclasses.fields(Lowering)})

  def build(self, final_endpoint: str | None = None, *, include_top: bool = False,
            num_classes: int = 1000, lowering: Lowering = Lowering(), dtype: Any = None,
            name: str | None = None, **module_options) -> nn.Module:
    """The Flax module up to `final_endpoint` (default: the last), unverified rewrites off;
    `module_options` (e.g. parent, drop_connect_rate) go to the module (drop_connect_rate
    only to a family that has drop-connect)."""
    if self.drop_connect_rate is None:
      module_options.pop('drop_connect_rate', None)
    return self.module(final_endpoint=final_endpoint or self.endpoints[-1],
                       include_top=include_top, num_classes=num_classes,
                       lowering=self.lowering(lowering), dtype=dtype, name=name,
                       **module_options)


def _partial(cls, **fixed):
  return lambda **kwargs: cls(**fixed, **kwargs)


def _declared() -> tuple[Backbone, ...]:
  families = [
      Backbone(
          'inception_v3', 'InceptionV3', inception.InceptionV3, inception.ENDPOINTS,
          has_stem=True, min_size=inception.MIN_SIZE, preprocessing='inception',
          weights=_official('inception_v3', 'inception_v3_weights_tf_dim_ordering_tf_kernels',
                            'bcbd6486424b2319ff4ef7d526e38f63',
                            '9a0d58056eeedaa3f26cb7ebd46da564', notop_size=87_910_968),
          keras_names='position', keras_order=inception.keras_layer_order,
          lowerings=frozenset({'fast_convs', 'fold_bn', 'merge_1x1', 'fast_pools'}),
          parity_endpoints=inception.ENDPOINTS),
  ]
  for depth, notop, top in ((16, '6d6bbae143d832006294945121d1f1fc',
                             '64373286793e3c8b2b4e3219cbf3544b'),
                            (19, '253f8cb515780f3b799900260a226db6',
                             'cbe5617147190e668d6c5d5026f83318')):
    families.append(Backbone(
        f'vgg{depth}', f'VGG{depth}', _partial(vgg.VGG, depth=depth), vgg.ENDPOINTS,
        has_stem=False, min_size=vgg.MIN_SIZE, preprocessing='caffe',
        weights=_official(f'vgg{depth}', f'vgg{depth}_weights_tf_dim_ordering_tf_kernels',
                          notop, top),
        top=('fc1', 'fc2', 'predictions'), parity_endpoints=vgg.ENDPOINTS))
  # Keras's resnet.py WEIGHTS_HASHES: (with top, without).
  for depth, (top, notop) in ((50, ('2cb95161c43110f7111970584f804107',
                                    '4d473c1dd8becc155b73f8504c6f6626')),
                              (101, ('f1aeb4b969a6efcfb50fad2f0c20cfc5',
                                     '88cf7a10940856eca736dc7b7e228a21')),
                              (152, ('100835be76be38e30d865e96f2aaae62',
                                     'ee4c566cf9a93f14d82f913c2dc6dd0c'))):
    families.append(Backbone(
        f'resnet{depth}', f'ResNet{depth}', _partial(resnet.ResNet, depth=depth),
        resnet.endpoints(depth), has_stem=True, min_size=resnet.MIN_SIZE,
        preprocessing='caffe',
        weights=_official('resnet', f'resnet{depth}_weights_tf_dim_ordering_tf_kernels',
                          notop, top),
        parity_endpoints=resnet.endpoints(depth)))
  families.append(Backbone(
      'xception', 'Xception', xception.Xception, xception.ENDPOINTS, has_stem=True,
      min_size=xception.MIN_SIZE, preprocessing='inception',
      weights=_official('xception', 'xception_weights_tf_dim_ordering_tf_kernels',
                        'b0042744bf5b25fce3cb969f33bebb97', '0a58e3b7378bc2990ea3b43d5981f1f6'),
      unnamed={'residual_conv': 'conv2d', 'residual_bn': 'batch_normalization'},
      parity_endpoints=xception.ENDPOINTS, unnamed_endpoints=xception.ENDPOINTS[:-1]))
  # Keras's efficientnet.py WEIGHTS_HASHES: (with top, without).
  for variant, (top, notop) in (('b0', ('902e53a9f72be733fc0bcb005b3ebbac',
                                        '50bc09e76180e00e4465e1a485ddc09d')),
                                ('b1', ('1d254153d4ab51201f1646940f018540',
                                        '74c4e6b3e1f6a1eea24c589628592432')),
                                ('b2', ('b15cce36ff4dcbd00b6dd88e7857a6ad',
                                        '111f8e2ac8aa800a7a99e3239f7bfb39')),
                                ('b3', ('ffd1fdc53d0ce67064dc6a9c7960ede0',
                                        'af6d107764bb5b1abb91932881670226')),
                                ('b4', ('18c95ad55216b8f92d7e70b3a046e2fc',
                                        'ebc24e6d6c33eaebbd558eafbeedf1ba')),
                                ('b5', ('ace28f2a6363774853a83a0b21b9421a',
                                        '38879255a25d3c92d5e44e04ae6cec6f')),
                                ('b6', ('165f6e37dce68623721b423839de8be5',
                                        '9ecce42647a20130c1f39a5d4cb75743')),
                                ('b7', ('8c03f828fec3ef71311cd463b6759d99',
                                        'cbcfe4450ddf6f3ad90b1b398090fe4a'))):
    base = f'https://storage.googleapis.com/keras-applications/efficientnet{variant}'
    families.append(Backbone(
        f'efficientnet_{variant}', f'EfficientNet{variant.upper()}',
        _partial(efficientnet.EfficientNet, variant=variant), efficientnet.endpoints(variant),
        has_stem=True, min_size=efficientnet.MIN_SIZE, preprocessing='raw',
        weights={'imagenet': WeightsFile(f'{base}_notop.h5', notop, None, False),
                 'imagenet_top': WeightsFile(f'{base}.h5', top, None, True)},
        unnamed={'normalization': 'normalization'},
        parity_endpoints=efficientnet.stage_ends(variant),
        drop_connect_rate=efficientnet.DROP_CONNECT_RATE,
        imagenet_variables=efficientnet.imagenet_variance))
  # Keras's mobilenet_v2.py names the files by alpha and input rows, and gives no MD5. The
  # 224-row files: Keras loads them for any input size other than 96, 128, 160 and 192 (square),
  # and the weights are the same network at any size. Alpha 1.0 first: `of_keras_name`'s.
  for alpha in sorted(mobilenet_v2.ALPHAS, key=lambda a: a != 1.0):
    stem = (f'{_KERAS_APPLICATIONS}mobilenet_v2/mobilenet_v2_weights_tf_dim_ordering_tf_kernels'
            f'_{float(alpha)}_224')
    families.append(Backbone(
        'mobilenet_v2' if alpha == 1.0 else f'mobilenet_v2_{alpha}', 'MobileNetV2',
        _partial(mobilenet_v2.MobileNetV2, alpha=alpha), mobilenet_v2.endpoints(alpha),
        has_stem=True, min_size=mobilenet_v2.MIN_SIZE, preprocessing='inception',
        weights={'imagenet': WeightsFile(f'{stem}_no_top.h5', None, None, False),
                 'imagenet_top': WeightsFile(f'{stem}.h5', None, None, True)},
        parity_endpoints=mobilenet_v2.endpoints(alpha), keras_args={'alpha': alpha}))
  return tuple(families)


BACKBONES: dict[str, Backbone] = {b.name: b for b in _declared()}
NAMES = tuple(BACKBONES)


def get(name: str | None) -> Backbone:
  """The declaration of config.model.backbone `name` (None: the default, InceptionV3)."""
  name = DEFAULT if name is None else name
  if name not in BACKBONES:
    raise errors.ConfigError(f'config.model.backbone must be one of {list(NAMES)}, got '
                             f'{name!r}.')
  return BACKBONES[name]


def of_module(module: nn.Module) -> Backbone:
  """The declaration a backbone module (as `Backbone.build` makes it) was built from."""
  for backbone in BACKBONES.values():
    built = backbone.build()
    if type(built) is type(module) and all(
        getattr(built, a, None) == getattr(module, a, None)
        for a in ('depth', 'variant', 'alpha')):
      return backbone
  raise ValueError(f'{type(module).__name__} is not a declared backbone.')


def of_keras_name(keras_name: str) -> Backbone | None:
  """The declaration of `keras.applications.<keras_name>`, or None (MobileNetV2: its first
  member, alpha 1.0; the members differ in `keras_args`)."""
  return next((b for b in BACKBONES.values() if b.keras_name == keras_name), None)
