"""The loss and accuracy plots read for 1 epoch as for 1,000: whole-epoch ticks, plain values,
the fine-tuning marker's label inside the axes, the legend off the curves, the run named."""

from matplotlib.backends.backend_agg import FigureCanvasAgg
import numpy as np
import pytest

from hhjax import metrics


def _rows(warmup: int, finetune: int, loss=lambda e: 1 / e, accuracy=lambda e: 1 - 0.5 / e):
  return [{'epoch': e, 'phase': 'warmup' if e <= warmup else 'finetune',
           'train_loss': loss(e), 'val_loss': loss(e) * 1.1,
           'train_accuracy': accuracy(e), 'val_accuracy': accuracy(e) * 0.9}
          for e in range(1, warmup + finetune + 1)]


def _extent(artist, renderer):
  return artist.get_window_extent(renderer)


@pytest.mark.parametrize('rows', [
    # One epoch whose loss barely moves: matplotlib's defaults gave ticks 0.96-1.04 and a y
    # axis in offset notation (1e-5+6.93e-1).
    _rows(1, 0, loss=lambda e: 0.693, accuracy=lambda e: 0.5),
    _rows(1, 1, loss=lambda e: 0.69301 + 1e-6 * e),
    _rows(9, 1),            # fine-tuning starts at the right edge: its label must not clip
    _rows(400, 600),
], ids=['1 epoch', '2 epochs', '10 epochs', '1000 epochs'])
def test_history_plots_are_readable(rows):
  for name, fig in metrics.history_figures(rows, 'run_name'):
    canvas = FigureCanvasAgg(fig)   # what savefig renders with
    canvas.draw()
    renderer = canvas.get_renderer()
    ax = fig.axes[0]
    low, high = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if low <= t <= high]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
    assert len(ticks) <= 12
    assert ax.yaxis.get_major_formatter().get_offset() == ''
    assert 'run_name' in ax.get_title()
    axes_box = _extent(ax, renderer)
    for text in ax.texts:   # the fine-tuning marker's label
      box = _extent(text, renderer)
      assert axes_box.x0 <= box.x0 and box.x1 <= axes_box.x1, (name, box, axes_box)
    legend, = fig.legends
    assert not _extent(legend, renderer).overlaps(axes_box)
  if any(r['phase'] == 'finetune' for r in rows) and rows[0]['phase'] == 'warmup':
    assert [t.get_text().strip() for t in ax.texts] == ['fine-tuning']


def test_plot_history_writes_both_pictures_titled_with_the_workdir(tmp_path):
  workdir = tmp_path / 'my_run'
  workdir.mkdir()
  paths = metrics.plot_history(_rows(2, 1), str(workdir))
  assert sorted(p.rsplit('/', 1)[1] for p in paths) == ['accuracy.png', 'loss.png']
  assert all(np.fromfile(p, np.uint8).size > 1000 for p in paths)
